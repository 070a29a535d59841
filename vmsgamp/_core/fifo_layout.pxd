# The Gen B ("vmamp_shmem") layout descriptor: csrc/vmamp_shmem.h, declared
# once here for every module that reads or writes it.
from vmsgamp._core.region cimport Region

cdef extern from "vmamp_shmem.h":
    enum:
        VMAMP_LAYOUT_MAGIC
        VMAMP_QUEUE_MAGIC
        VMAMP_LAYOUT_LENGTH
        VMAMP_LAYOUT_VERSION
        VMAMP_FEAT_KNOWN
        VMAMP_MAX_NUM_NOTIF
        VMAMP_DEFAULT_WINDOW
        VMAMP_STATE_MASK
        VMAMP_STATE_INIT
        VMAMP_STATE_READY
        VMAMP_STATE_RUN
        VMAMP_STATE_SHUTDOWN
        VMAMP_STATE_PEER_DEAD
        VMAMP_STATUS_F_WAITING
        VMAMP_STATUS_F_SUPPRESS
        VMAMP_STATUS_F_LOCKED
        VMAMP_FEAT_MASKED_NOTIF
        VMAMP_OFF_MAGIC
        VMAMP_OFF_LENGTH
        VMAMP_OFF_VERSION
        VMAMP_OFF_FEATURES
        VMAMP_OFF_NUM_NOTIF
        VMAMP_OFF_NUM_VQ_NOTIF
        VMAMP_OFF_NUM_ELEMENTS
        VMAMP_OFF_SIZE_ELEMENTS
        VMAMP_OFF_RESERVED
        VMAMP_OFF_DEV_NOTIF
        VMAMP_OFF_DEV_HEAD
        VMAMP_OFF_DEV_ELEMENTS
        VMAMP_OFF_DRV_NOTIF
        VMAMP_OFF_DRV_HEAD
        VMAMP_OFF_DRV_ELEMENTS
        VMAMP_QH_OFF_MAGIC
        VMAMP_QH_OFF_STATUS
        VMAMP_QH_OFF_PROD
        VMAMP_QH_OFF_CONS
        VMAMP_ALIGN
        VMAMP_LAYOUT_SIZE
        VMAMP_QUEUE_HEAD_SIZE

# The device side's three steps, in this order, with the caller's release
# fence between the first two (see write_fields in fifo_layout.pyx).
cdef void layout_invalidate(char *base) noexcept nogil
cdef int layout_write_fields(char *base, dict lay) except -1
cdef void layout_publish(char *base) noexcept nogil

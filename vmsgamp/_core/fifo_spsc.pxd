# The Gen A ("spsc_queue") FIFO blocks: csrc/spsc_queue.h, declared once here.

cdef extern from "spsc_queue.h":
    enum:
        SPSC_PACKET_SIZE
        SPSC_BLOCK_SIZE
        SPSC_OFF_PROD
        SPSC_OFF_CONS
        SPSC_OFF_PACKETS
        SPSC_CAPACITY
        SPSC_OFF_EXT_WAITING
        SPSC_OFF_EXT_MAGIC
        SPSC_EXT_MAGIC

cdef void spsc_zero_block(char *blk, int memtype) noexcept nogil
cdef tuple spsc_pick_up(char *tx_block, char *rx_block)
cdef void spsc_advertise_suppress(char *rx_block) noexcept nogil

/*
 * vmk_wire.h - virtio-msg message numbers and payload offsets for the C kit
 * (the "G2" generation: 8-byte header with token; padded GET/SET_VQUEUE).
 *
 * The Python codec (vmsgamp/protocol) is the other implementation of the
 * same wire format; tests/test_kit_c.py compiles this header and checks that
 * both agree.  Offsets are from the start of the message (header included).
 */
#ifndef VMK_WIRE_H
#define VMK_WIRE_H

/* ---- header ------------------------------------------------------------- */
#define VMK_HDR_TYPE          0u   /* u8: bit0 response, bit1 bus, bits 2..7 ignored */
#define VMK_HDR_MSG_ID        1u   /* u8 */
#define VMK_HDR_DEV_NUM       2u   /* le16 (0 for bus messages) */
#define VMK_HDR_TOKEN         4u   /* le16: echoed in responses, 0 in events */
#define VMK_HDR_MSG_SIZE      6u   /* le16: header + payload */
#define VMK_HDR_SIZE          8u

#define VMK_TYPE_RESPONSE     0x01u
#define VMK_TYPE_BUS          0x02u
#define VMK_MSG_ID_EVENT      0x40u   /* bit 6: an event, never answered */

/* ---- transport message ids ------------------------------------------------ */
#define VMK_GET_DEVICE_INFO      0x02u
#define VMK_GET_DEVICE_FEATURES  0x03u
#define VMK_SET_DRIVER_FEATURES  0x04u
#define VMK_GET_CONFIG           0x05u
#define VMK_SET_CONFIG           0x06u
#define VMK_GET_DEVICE_STATUS    0x07u
#define VMK_SET_DEVICE_STATUS    0x08u
#define VMK_GET_VQUEUE           0x09u
#define VMK_SET_VQUEUE           0x0Au
#define VMK_RESET_VQUEUE         0x0Bu
#define VMK_GET_SHM              0x0Cu
#define VMK_EVENT_CONFIG         0x40u
#define VMK_EVENT_AVAIL          0x41u
#define VMK_EVENT_USED           0x42u

/* ---- bus message ids --------------------------------------------------------- */
#define VMK_BUS_GET_DEVICES      0x02u
#define VMK_BUS_PING             0x03u
#define VMK_BUS_EVENT_DEVICE     0x40u
#define VMK_DEVICE_READY         0x0001u
#define VMK_DEVICE_REMOVED       0x0002u

/* ---- payload offsets (P = VMK_HDR_SIZE) ---------------------------------------- */
#define VMK_P VMK_HDR_SIZE
/* GET_DEVICE_INFO response: 24 bytes */
#define VMK_INFO_DEVICE_ID       (VMK_P + 0u)
#define VMK_INFO_VENDOR_ID       (VMK_P + 4u)
#define VMK_INFO_FEATURE_BITS    (VMK_P + 8u)
#define VMK_INFO_CONFIG_SIZE     (VMK_P + 12u)
#define VMK_INFO_MAX_VQS         (VMK_P + 16u)
#define VMK_INFO_ADMIN_START     (VMK_P + 20u)
#define VMK_INFO_ADMIN_COUNT     (VMK_P + 22u)
#define VMK_INFO_SIZE            (VMK_P + 24u)
/* GET_DEVICE_FEATURES request / response, SET_DRIVER_FEATURES request */
#define VMK_FEAT_BLOCK_INDEX     (VMK_P + 0u)
#define VMK_FEAT_NUM_BLOCKS      (VMK_P + 4u)
#define VMK_FEAT_WORDS           (VMK_P + 8u)
/* GET_CONFIG request: offset, length; response and SET_CONFIG request:
 * generation, offset, length, data */
#define VMK_GETCFG_OFFSET        (VMK_P + 0u)
#define VMK_GETCFG_LENGTH        (VMK_P + 4u)
#define VMK_CFG_GENERATION       (VMK_P + 0u)
#define VMK_CFG_OFFSET           (VMK_P + 4u)
#define VMK_CFG_LENGTH           (VMK_P + 8u)
#define VMK_CFG_DATA             (VMK_P + 12u)
/* GET/SET_DEVICE_STATUS */
#define VMK_STATUS               (VMK_P + 0u)
/* GET_VQUEUE request / RESET_VQUEUE / GET_SHM request: index */
#define VMK_VQ_INDEX             (VMK_P + 0u)
/* GET_VQUEUE response (40 bytes) */
#define VMK_GETVQ_MAX_SIZE       (VMK_P + 4u)
#define VMK_GETVQ_CUR_SIZE       (VMK_P + 8u)
#define VMK_GETVQ_DESC           (VMK_P + 16u)
#define VMK_GETVQ_DRIVER         (VMK_P + 24u)
#define VMK_GETVQ_DEVICE         (VMK_P + 32u)
#define VMK_GETVQ_SIZE           (VMK_P + 40u)
/* SET_VQUEUE request (40 bytes) */
#define VMK_SETVQ_SIZE           (VMK_P + 8u)
#define VMK_SETVQ_DESC           (VMK_P + 16u)
#define VMK_SETVQ_DRIVER         (VMK_P + 24u)
#define VMK_SETVQ_DEVICE         (VMK_P + 32u)
#define VMK_SETVQ_MSG_SIZE       (VMK_P + 40u)
/* GET_SHM response: index, length, address (le32 each) */
#define VMK_SHM_LENGTH           (VMK_P + 4u)
#define VMK_SHM_ADDRESS          (VMK_P + 8u)
/* EVENT_CONFIG: status, generation, offset, length, data */
#define VMK_EVCFG_STATUS         (VMK_P + 0u)
#define VMK_EVCFG_GENERATION     (VMK_P + 4u)
#define VMK_EVCFG_OFFSET         (VMK_P + 8u)
#define VMK_EVCFG_LENGTH         (VMK_P + 12u)
/* EVENT_AVAIL: vq_index, next_offset_wrap; EVENT_USED: vq_index */
#define VMK_EVAVAIL_NEXT         (VMK_P + 4u)
/* bus GET_DEVICES request: offset le16, count le16; response adds
 * next_offset le16 and the bitmap */
#define VMK_GETDEV_OFFSET        (VMK_P + 0u)
#define VMK_GETDEV_COUNT         (VMK_P + 2u)
#define VMK_GETDEV_NEXT          (VMK_P + 4u)
#define VMK_GETDEV_BITMAP        (VMK_P + 6u)
/* bus PING: data le32 */
#define VMK_PING_DATA            (VMK_P + 0u)
/* bus EVENT_DEVICE: device number le16, state le16 */
#define VMK_EVDEV_NUMBER         (VMK_P + 0u)
#define VMK_EVDEV_STATE          (VMK_P + 2u)

/* The smallest msg_size of each request the device accepts (header included). */
#define VMK_MIN_GET_DEVICE_FEATURES  (VMK_P + 8u)
#define VMK_MIN_SET_DRIVER_FEATURES  (VMK_P + 8u)
#define VMK_MIN_GET_CONFIG           (VMK_P + 8u)
#define VMK_MIN_SET_CONFIG           (VMK_P + 12u)
#define VMK_MIN_SET_DEVICE_STATUS    (VMK_P + 4u)
#define VMK_MIN_INDEX                (VMK_P + 4u)   /* GET_VQUEUE, RESET_VQUEUE, GET_SHM */
#define VMK_MIN_SET_VQUEUE           (VMK_P + 40u)
#define VMK_MIN_EVENT_AVAIL          (VMK_P + 8u)
#define VMK_MIN_GET_DEVICES          (VMK_P + 4u)
#define VMK_MIN_PING                 (VMK_P + 4u)

/* virtio device status bits */
#define VMK_ST_ACKNOWLEDGE        0x01u
#define VMK_ST_DRIVER             0x02u
#define VMK_ST_DRIVER_OK          0x04u
#define VMK_ST_FEATURES_OK        0x08u
#define VMK_ST_NEEDS_RESET        0x40u
#define VMK_ST_FAILED             0x80u

#define VMK_F_VERSION_1          32
#define VMK_NUM_FEATURE_BITS     64u   /* Linux refuses anything else */

#endif /* VMK_WIRE_H */

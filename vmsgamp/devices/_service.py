"""The device-side queue-service routine shared by every transport.

Both the AMP bus (``vmsgamp.bus.DeviceTransport``) and the vhost-user
back-end (``vmsgamp.vhost_user``) serve a kicked virtqueue the same way, as
vhost and rust-vmm do:

1. disable kicks, let the model pop and complete chains, re-enable kicks;
2. ``enable_notification()`` re-reads the available index after the
   re-enable (its fence closes the lost-kick race), so chains published
   while kicks were off are served in another round;
3. after a bounded number of rounds, give the loop back (``more``): one busy
   queue must not starve the others or the message channel;
   a caller that keeps polling the ring itself (the vhost-user back-end's
   spin) passes ``rearm=False``: kicks stay off at the end, and it must call
   ``enable_notification()`` (and serve what that finds) before it sleeps;
4. if anything was used, ``needs_notification()`` says whether the driver
   wants to hear about it (flags or event index); the caller rings.

A corrupted ring (``QueueBrokenError``) or an exception from the model ends
with the queue marked broken and the reason handed to the caller, which
tells its driver in its own way (DEVICE_NEEDS_RESET, the vring error fd).
The routine never raises for what the driver wrote.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vmsgamp._core.virtq import QueueBrokenError
from vmsgamp.errors import SharedObjectLost

log = logging.getLogger("vmsgamp.devices")

MAX_ROUNDS = 16   # handle_queue rounds per wake-up before yielding to the loop


@dataclass(frozen=True)
class Serviced:
    """What one service call found.

    ``notify``: used buffers were added and the driver wants a notification.
    ``more``: chains were still arriving after ``max_rounds``; serve again soon.
    ``broken``: the queue is broken (already marked so); the reason to report.
    """

    notify: bool = False
    more: bool = False
    broken: str | None = None


IDLE = Serviced()
# The outcomes without a broken queue, made once: a kick allocates none.
_OUTCOMES = {(notify, more): Serviced(notify=notify, more=more) for notify in (False, True)
             for more in (False, True)}


def service_queue(device: Any, index: int, queue: Any, *, max_rounds: int = MAX_ROUNDS,
                  rearm: bool = True) -> Serviced:
    """Serve a kick on ``queue`` (queue ``index`` of ``device``).  With
    ``rearm=False`` driver notifications are left off (step 3)."""
    used = False
    more = False
    try:
        for _ in range(max_rounds):
            queue.disable_notification()
            used |= bool(device.handle_queue(index, queue))
            # With EVENT_IDX re-enabling moves avail_event to the next chain,
            # so the driver would kick for it: a polling caller must not.
            more = queue.enable_notification() if rearm else queue.has_available()
            if not more:
                break
    except QueueBrokenError as e:
        return Serviced(broken=e.reason)
    except SharedObjectLost:
        raise  # the memory itself is gone: not this queue's fault, the endpoint must stop
    except Exception as e:  # a model bug must not take the transport down
        log.exception("%s: queue %d handler failed", getattr(device, "name", "device"), index)
        reason = f"device model error: {e}"
        queue.mark_broken(reason)
        return Serviced(broken=reason)
    if not used:
        return _OUTCOMES[False, more]
    try:
        notify = bool(queue.needs_notification())
    except QueueBrokenError as e:
        return Serviced(broken=e.reason)
    return _OUTCOMES[notify, more]


def needs_notification(queue: Any) -> Serviced:
    """Whether the driver wants a used-buffer notification now (after the
    model added used buffers on its own, or at the end of a service call)."""
    try:
        return _OUTCOMES[bool(queue.needs_notification()), False]
    except QueueBrokenError as e:
        return Serviced(broken=e.reason)

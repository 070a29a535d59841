"""Exception hierarchy shared by every layer (no imports from _core or protocol).

Local errors are the caller's mistakes; remote errors are what the peer on the
other side of shared memory did.  A remote error never crashes the process:
the message is dropped (and counted) or the object is marked broken.
"""


class VmsgampError(Exception):
    """Root of every vmsgamp error."""


class LocalProtocolError(VmsgampError):
    """This side tried to do something the protocol does not allow."""


class RemoteProtocolError(VmsgampError):
    """The peer sent something malformed.  Counted and dropped."""


class BadMessageSize(RemoteProtocolError):
    """A FIFO slot held a msg_size outside [header size, slot size]; the
    message was consumed and dropped.  ``data`` is what was read: the whole
    slot (a message is at most one slot), for a tracer to record."""

    def __init__(self, msg_size: int, low: int, high: int, data: bytes = b""):
        super().__init__(f"peer message has msg_size {msg_size}, outside [{low}, {high}]; dropped")
        self.msg_size = msg_size
        self.data = data


class LayoutError(VmsgampError, ValueError):
    """A shared-memory layout failed validation; ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"bad AMP layout: {field}: {message}")
        self.field = field


class FifoBrokenError(VmsgampError):
    """The peer wrote an impossible index; the FIFO refuses further traffic."""

    def __init__(self, reason: str):
        super().__init__(f"FIFO broken: {reason}")
        self.reason = reason


class PeerStateError(VmsgampError):
    """The peer's queue head left RUN.  ``event`` is 'restart' (RUN -> INIT or
    READY: silent restart), 'shutdown' or 'dead'.  The FIFO has stopped; call
    ``start()`` to run the handshake again."""

    def __init__(self, event: str, peer_state: str):
        super().__init__(f"peer {event}: its queue head is now {peer_state}")
        self.event = event
        self.peer_state = peer_state


class PeerRestarted(PeerStateError):
    pass


class PeerShutdown(PeerStateError):
    pass


class HandshakeTimeout(VmsgampError, TimeoutError):
    """The peer did not complete the FIFO handshake in time."""


class ObjectTooSmall(VmsgampError, ValueError):
    """A mapping was refused at map time: it would reach past the end of the
    file, shm object or memfd behind it (touching those pages would raise
    SIGBUS)."""


class SharedObjectLost(VmsgampError):
    """The object behind a mapping shrank while it was mapped (someone
    truncated the shm object or file).  The mapping now holds private zero
    pages; the Region and everything built on it refuse further use.
    ``uri`` names the region."""

    def __init__(self, uri: str | None):
        where = uri or "a region"
        super().__init__(f"the shared object shrank: {where} was truncated while mapped "
                         f"and cannot be used any more")
        self.uri = uri


class FifoClosedError(VmsgampError, ValueError):
    """The FIFO was closed (possibly by another thread while this one was
    waiting on it)."""

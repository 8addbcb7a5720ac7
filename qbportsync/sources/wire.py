"""
What the NAT-PMP (RFC 6886) and PCP (RFC 6887) wire formats share: the
server port, the parse errors, the transports a mapping names, and one
vocabulary of result codes into which each protocol's numbering is mapped.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Literal

from attrs import frozen

SERVER_PORT = 5351
"""NAT-PMP and PCP servers share this port (RFC 6887 §19.1)."""

IPProto = Literal["TCP", "UDP"]
"""The transport protocol a mapping forwards."""


@frozen
class EpochSample:
    """One report of the gateway's epoch (seconds since it lost its state)."""

    epoch: int
    """The gateway's seconds since its mapping table was created."""
    at: float
    """Our clock when it arrived."""


class ParseError(Exception):
    """A datagram that is not a well-formed message of the protocol spoken."""

    reason = "malformed"
    """Label for the datagrams_dropped metric."""


class WrongLength(ParseError):
    """Not a length the protocol allows for this message."""

    reason = "length"


class WrongVersion(ParseError):
    """A version byte this codec does not speak."""

    reason = "version"


class WrongOpcode(ParseError):
    """An opcode this codec does not know, or a request where a response belongs."""

    reason = "opcode"


class UnknownResult(ParseError):
    """A result code the RFC does not define: fatal for the request it answers."""

    reason = "result"

    def __init__(self, opcode: int, result: int) -> None:
        super().__init__(f"unknown result code {result} for opcode {opcode}")
        self.opcode = opcode
        self.result = result


class Result(Enum):
    """
    What a gateway answered, in one vocabulary for both protocols (PCP's
    names, RFC 6887 §7.4; NAT-PMP's five errors map onto them).
    """

    SUCCESS = "success"
    UNSUPP_VERSION = "unsupported version"
    NOT_AUTHORIZED = "not authorized (refused)"
    MALFORMED_REQUEST = "malformed request"
    UNSUPP_OPCODE = "unsupported opcode"
    UNSUPP_OPTION = "unsupported option"
    MALFORMED_OPTION = "malformed option"
    NETWORK_FAILURE = "network failure"
    NO_RESOURCES = "out of resources"
    UNSUPP_PROTOCOL = "unsupported protocol"
    USER_EX_QUOTA = "user exceeded quota"
    CANNOT_PROVIDE_EXTERNAL = "cannot provide external address"
    ADDRESS_MISMATCH = "address mismatch"
    EXCESSIVE_REMOTE_PEERS = "excessive remote peers"

    @property
    def unsupported(self) -> bool:
        """The gateway does not offer this kind of mapping at all."""
        return self in _UNSUPPORTED

    @property
    def permanent(self) -> bool:
        """Asking again unchanged cannot succeed: someone must fix something."""
        return self in _PERMANENT


_UNSUPPORTED = frozenset(
    {Result.UNSUPP_VERSION, Result.UNSUPP_OPCODE, Result.UNSUPP_PROTOCOL}
)
_PERMANENT = _UNSUPPORTED | {
    Result.NOT_AUTHORIZED,
    Result.MALFORMED_REQUEST,
    Result.UNSUPP_OPTION,
    Result.MALFORMED_OPTION,
    Result.ADDRESS_MISMATCH,
}


class ResultTable:
    """One protocol's numbering of L{Result}s, both ways."""

    def __init__(self, codes: Mapping[int, Result]) -> None:
        self._results = dict(codes)
        self._codes = {result: code for code, result in codes.items()}

    @property
    def known(self) -> tuple[Result, ...]:
        """The results this protocol can express."""
        return tuple(self._codes)

    def decode(self, opcode: int, value: int) -> Result:
        """The result numbered C{value}; L{UnknownResult} if there is none."""
        try:
            return self._results[value]
        except KeyError:
            raise UnknownResult(opcode, value) from None

    def encode(self, result: Result) -> int:
        """The number of C{result}; C{KeyError} if this protocol lacks it."""
        return self._codes[result]

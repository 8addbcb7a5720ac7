"""The NAT-PMP wire codec: exact bytes, round trips, and fuzzing."""

from __future__ import annotations

import contextlib

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from qbportsync.sources.natpmp import (
    RESULTS,
    ErrorResponse,
    ExternalAddressRequest,
    ExternalAddressResponse,
    MapRequest,
    MapResponse,
    Request,
    Response,
    UnsupportedVersion,
    decodeRequest,
    decodeResponse,
    encodeRequest,
    encodeResponse,
)
from qbportsync.sources.wire import (
    ParseError,
    Result,
    UnknownResult,
    WrongLength,
    WrongOpcode,
    WrongVersion,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
transports = st.sampled_from(["TCP", "UDP"])
results = st.sampled_from(RESULTS.known)
failures = st.sampled_from([r for r in RESULTS.known if r != Result.SUCCESS])
addresses = st.ip_addresses(v=4).map(str)

requests: st.SearchStrategy[Request] = st.one_of(
    st.just(ExternalAddressRequest()),
    st.builds(MapRequest, transports, u16, u16, u32),
)
responses: st.SearchStrategy[Response] = st.one_of(
    st.builds(ExternalAddressResponse, results, u32, addresses),
    st.builds(MapResponse, transports, results, u32, u16, u16, u32),
    st.builds(ErrorResponse, st.sampled_from([128, 129, 130]), failures, u32),
    st.builds(ErrorResponse, st.just(0), st.just(Result.UNSUPP_VERSION), u32),
    st.builds(UnsupportedVersion, st.integers(1, 255)),
)


class ExactBytesTests(SynchronousTestCase):
    """The layouts of RFC 6886 §3.2-§3.5, byte for byte."""

    def test_externalAddressRequest(self) -> None:
        """The address request is two zero bytes."""
        self.assertEqual(encodeRequest(ExternalAddressRequest()), b"\x00\x00")

    def test_mapRequest(self) -> None:
        """A TCP map request: version, opcode 2, reserved, ports, lifetime."""
        self.assertEqual(
            encodeRequest(MapRequest("TCP", 51413, 1024, 60)),
            bytes.fromhex("0002 0000 c8d5 0400 0000003c"),
        )
        self.assertEqual(
            encodeRequest(MapRequest("UDP", 1, 2, 3)),
            bytes.fromhex("0001 0000 0001 0002 00000003"),
        )

    def test_externalAddressResponse(self) -> None:
        """A 12-byte address response decodes to result, epoch and address."""
        self.assertEqual(
            decodeResponse(bytes.fromhex("0080 0000 0000012c cb007105")),
            ExternalAddressResponse(Result.SUCCESS, 300, "203.0.113.5"),
        )

    def test_mapResponse(self) -> None:
        """A 16-byte map response decodes to ports and granted lifetime."""
        self.assertEqual(
            decodeResponse(bytes.fromhex("0081 0000 00000007 c8d5 0400 0000003c")),
            MapResponse("UDP", Result.SUCCESS, 7, 51413, 1024, 60),
        )

    def test_shortError(self) -> None:
        """An 8-byte failure (what miniupnpd sends for bad versions) decodes."""
        self.assertEqual(
            decodeResponse(bytes.fromhex("0082 0005 00000009")),
            ErrorResponse(130, Result.UNSUPP_OPCODE, 9),
        )

    def test_rfcUnsupportedVersion(self) -> None:
        """RFC 6886's unsupported-version error has opcode 0."""
        self.assertEqual(
            decodeResponse(bytes.fromhex("0000 0001 00000002")),
            ErrorResponse(0, Result.UNSUPP_VERSION, 2),
        )

    def test_pcpUnsupportedVersion(self) -> None:
        """A PCP header whose byte 3 is 1 means the gateway refused version 0."""
        header = bytes.fromhex("0281 0001") + bytes(20)
        self.assertEqual(decodeResponse(header), UnsupportedVersion(2))

    def test_wrongLength(self) -> None:
        """A success response of the wrong size is refused."""
        good = bytes.fromhex("0081 0000 00000007 c8d5 0400 0000003c")
        for data in (good[:-1], good + b"\x00", good[:8], b"", b"\x00"):
            self.assertRaises(WrongLength, decodeResponse, data)

    def test_wrongVersion(self) -> None:
        """Version 1 without the unsupported-version code is refused."""
        self.assertRaises(
            WrongVersion, decodeResponse, bytes.fromhex("0180 0000 00000000 01020304")
        )

    def test_requestOpcodeInResponse(self) -> None:
        """A datagram with a request opcode (our own echoed back) is refused."""
        self.assertRaises(
            WrongOpcode, decodeResponse, bytes.fromhex("0001 0000 c8d5 0400 0000003c")
        )
        self.assertRaises(
            WrongOpcode, decodeResponse, bytes.fromhex("0083 0000 00000000")
        )

    def test_unknownResult(self) -> None:
        """An undefined result code raises UnknownResult naming the opcode."""
        error = self.assertRaises(
            UnknownResult,
            decodeResponse,
            bytes.fromhex("0081 0006 00000007 c8d5 0400 0000003c"),
        )
        self.assertEqual((error.opcode, error.result), (129, 6))

    def test_parseErrorsShareBase(self) -> None:
        """Every codec error is a ParseError with a metric reason."""
        for cls in (WrongLength, WrongVersion, WrongOpcode):
            self.assertTrue(issubclass(cls, ParseError))
        self.assertEqual(
            {WrongLength.reason, WrongVersion.reason, WrongOpcode.reason},
            {"length", "version", "opcode"},
        )


class RoundTripTests(SynchronousTestCase):
    """Every valid message survives encode then decode."""

    @given(requests)
    def test_requests(self, request: Request) -> None:
        """decodeRequest inverts encodeRequest."""
        self.assertEqual(decodeRequest(encodeRequest(request)), request)

    @given(responses)
    def test_responses(self, response: Response) -> None:
        """decodeResponse inverts encodeResponse."""
        self.assertEqual(decodeResponse(encodeResponse(response)), response)


class FuzzTests(SynchronousTestCase):
    """Garbage never raises anything but ParseError."""

    @given(st.binary(max_size=64))
    @example(b"\x02\x80\x00\x01")
    @example(b"\x00\x80\x00\x07\x00\x00\x00\x00")
    def test_randomResponses(self, data: bytes) -> None:
        """Random bytes either decode or raise ParseError."""
        with contextlib.suppress(ParseError):
            decodeResponse(data)

    @given(st.binary(max_size=64))
    def test_randomRequests(self, data: bytes) -> None:
        """Random bytes either decode as a request or raise ParseError."""
        with contextlib.suppress(ParseError):
            decodeRequest(data)

    @given(responses, st.data())
    def test_mutatedResponses(self, response: Response, data: st.DataObject) -> None:
        """A valid response with bytes flipped, cut or added stays contained."""
        raw = bytearray(encodeResponse(response))
        for _ in range(data.draw(st.integers(1, 4))):
            action = data.draw(st.sampled_from(["flip", "cut", "add"]))
            if action == "flip" and raw:
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(
                    st.integers(1, 255)
                )
            elif action == "cut" and raw:
                del raw[data.draw(st.integers(0, len(raw) - 1))]
            else:
                raw.append(data.draw(st.integers(0, 255)))
        with contextlib.suppress(ParseError):
            decodeResponse(bytes(raw))

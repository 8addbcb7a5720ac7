"""The PCP wire codec, result codes, epoch rule and schedules: pure, no I/O."""

from __future__ import annotations

import contextlib
import itertools

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from qbportsync.sources import natpmp
from qbportsync.sources.pcp import (
    RESULTS,
    AnnounceRequest,
    AnnounceResponse,
    MalformedOption,
    MapRequest,
    MapResponse,
    Request,
    Response,
    UnknownProtocol,
    UnsupportedVersion,
    WrongDirection,
    decodeRequest,
    decodeResponse,
    encodeRequest,
    encodeResponse,
    epochInvalid,
)
from qbportsync.sources.pcpclient import (
    probeWaits,
    renewalPoint,
    renewalWaits,
    retransmissions,
)
from qbportsync.sources.wire import (
    EpochSample,
    ParseError,
    Result,
    UnknownResult,
    WrongLength,
    WrongOpcode,
    WrongVersion,
)

NONCE = bytes(range(1, 13))
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
nonces = st.binary(min_size=12, max_size=12)
transports = st.sampled_from(["TCP", "UDP"])
results = st.sampled_from(RESULTS.known)
addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    # IPv4-mapped ones decode as dotted IPv4, by design.
    st.ip_addresses(v=6).map(str).filter(lambda a: not a.startswith("::ffff:")),
)

requests: st.SearchStrategy[Request] = st.one_of(
    st.builds(AnnounceRequest, addresses),
    st.builds(MapRequest, nonces, transports, u16, u16, addresses, u32, addresses),
)
responses: st.SearchStrategy[Response] = st.one_of(
    st.builds(AnnounceResponse, results, u32, u32),
    st.builds(MapResponse, results, u32, u32, nonces, transports, u16, u16, addresses),
    st.builds(UnsupportedVersion, st.integers(0, 255).filter(lambda v: v != 2)),
)

MAP_RESPONSE = MapResponse(
    Result.SUCCESS, 120, 7, NONCE, "TCP", 6881, 1024, "203.0.113.5"
)


class ExactBytesTests(SynchronousTestCase):
    """The layouts of RFC 6887 §7 and §11.1, byte for byte."""

    def test_mapRequest(self) -> None:
        """MAP request: 24-byte header, client as ::ffff:IPv4, 36-byte body."""
        data = encodeRequest(
            MapRequest(NONCE, "UDP", 6881, 6882, "0.0.0.0", 60, "198.51.100.2")
        )
        self.assertEqual(
            data.hex(),
            "02010000" + "0000003c"
            "00000000000000000000ffffc6336402" + NONCE.hex() + "11000000" + "1ae11ae2"
            "00000000000000000000ffff00000000",
        )

    def test_mapResponse(self) -> None:
        """A MAP response: R bit, result byte, lifetime, epoch, 12 reserved, body."""
        data = encodeResponse(MAP_RESPONSE)
        self.assertEqual(len(data), 60)
        self.assertEqual(data[:12].hex(), "028100000000007800000007")
        self.assertEqual(data[12:24], bytes(12))
        self.assertEqual(data[36:40].hex(), "06000000")
        self.assertEqual(data[40:44].hex(), "1ae10400")

    def test_announce(self) -> None:
        """ANNOUNCE responses are the 24-byte header alone."""
        data = encodeResponse(AnnounceResponse(Result.SUCCESS, 0, 99))
        self.assertEqual(data.hex(), "028000000000000000000063" + "00" * 12)

    def test_natpmpUnsupportedVersion(self) -> None:
        """A NAT-PMP gateway's answer to PCP reads as UnsupportedVersion(0)."""
        self.assertEqual(
            decodeResponse(bytes.fromhex("0080000100000123")), UnsupportedVersion(0)
        )

    def test_ipv6Address(self) -> None:
        """Addresses that are not IPv4-mapped stay IPv6."""
        response = decodeResponse(
            encodeResponse(
                MapResponse(Result.SUCCESS, 1, 2, NONCE, "UDP", 1, 2, "2001:db8::1")
            )
        )
        assert isinstance(response, MapResponse)
        self.assertEqual(response.externalAddress, "2001:db8::1")


class ValidationTests(SynchronousTestCase):
    """§8.3: each rule a response must pass."""

    def test_tooShort(self) -> None:
        """Under 24 bytes (but version 2) is a length error."""
        self.assertRaises(
            WrongLength, decodeResponse, encodeResponse(MAP_RESPONSE)[:20]
        )
        self.assertRaises(WrongLength, decodeResponse, b"\x02\x81")

    def test_notMultipleOfFour(self) -> None:
        """A length not a multiple of 4 is a length error."""
        self.assertRaises(
            WrongLength, decodeResponse, encodeResponse(MAP_RESPONSE) + b"\x00"
        )

    def test_tooLong(self) -> None:
        """Over 1100 bytes is a length error, even with valid options."""
        option = b"\x80\x00\x04\x00" + bytes(1024)
        data = encodeResponse(MAP_RESPONSE) + option
        self.assertEqual(len(data), 1088)
        decodeResponse(data)
        self.assertRaises(
            WrongLength, decodeResponse, data + b"\x80\x00\x00\x10" + bytes(16)
        )

    def test_requestBit(self) -> None:
        """A message without the R bit is not a response."""
        data = bytearray(encodeResponse(MAP_RESPONSE))
        data[1] = 0x01
        self.assertRaises(WrongDirection, decodeResponse, bytes(data))

    def test_otherVersion(self) -> None:
        """Version 1 with a result other than UNSUPP_VERSION is a version error."""
        data = bytearray(encodeResponse(MAP_RESPONSE))
        data[0] = 1
        self.assertRaises(WrongVersion, decodeResponse, bytes(data))

    def test_opcode(self) -> None:
        """PEER (2) and unknown opcodes are not ours."""
        data = bytearray(encodeResponse(MAP_RESPONSE))
        data[1] = 0x82
        self.assertRaises(WrongOpcode, decodeResponse, bytes(data))

    def test_unknownResult(self) -> None:
        """Result codes past 13 are rejected, naming the opcode."""
        data = bytearray(encodeResponse(MAP_RESPONSE))
        data[3] = 14
        error = self.assertRaises(UnknownResult, decodeResponse, bytes(data))
        self.assertEqual((error.opcode, error.result), (1, 14))

    def test_shortMap(self) -> None:
        """A MAP response without its 36-byte body cannot be matched."""
        data = bytearray(encodeResponse(AnnounceResponse(Result.SUCCESS, 0, 1)))
        data[1] = 0x81
        self.assertRaises(WrongLength, decodeResponse, bytes(data))

    def test_protocol(self) -> None:
        """A MAP for a protocol other than TCP and UDP is rejected."""
        data = bytearray(encodeResponse(MAP_RESPONSE))
        data[36] = 0
        self.assertRaises(UnknownProtocol, decodeResponse, bytes(data))

    def test_options(self) -> None:
        """Options are skipped when well formed, rejected when they overrun."""
        base = encodeResponse(MAP_RESPONSE)
        self.assertEqual(
            decodeResponse(base + b"\x01\x00\x00\x02\xaa\xbb\x00\x00"), MAP_RESPONSE
        )
        self.assertRaises(
            MalformedOption, decodeResponse, base + b"\x01\x00\x00\x08\xaa\xbb\x00\x00"
        )

    def test_errorLifetime(self) -> None:
        """An error response carries its lifetime: how long not to ask again."""
        response = decodeResponse(
            encodeResponse(
                MapResponse(
                    Result.NO_RESOURCES, 30, 5, NONCE, "TCP", 6881, 0, "0.0.0.0"
                )
            )
        )
        assert isinstance(response, MapResponse)
        self.assertEqual(
            (response.result, response.lifetime), (Result.NO_RESOURCES, 30)
        )

    def test_requestChecks(self) -> None:
        """decodeRequest (for fakes) rejects responses and other versions."""
        self.assertRaises(WrongDirection, decodeRequest, encodeResponse(MAP_RESPONSE))
        self.assertRaises(WrongVersion, decodeRequest, b"\x00" * 60)


class ResultTests(SynchronousTestCase):
    """One result type for both protocols, each with its own numbering."""

    def test_sameMeaningSameResult(self) -> None:
        """NAT-PMP's 4 and PCP's 8 are both "out of resources"."""
        self.assertIs(natpmp.RESULTS.decode(130, 4), Result.NO_RESOURCES)
        self.assertIs(RESULTS.decode(1, 8), Result.NO_RESOURCES)
        self.assertEqual(
            (
                natpmp.RESULTS.encode(Result.NOT_AUTHORIZED),
                RESULTS.encode(Result.NOT_AUTHORIZED),
            ),
            (2, 2),
        )

    def test_natpmpLacksPCPResults(self) -> None:
        """NAT-PMP has no number for PCP-only results; PCP has all of them."""
        self.assertNotIn(Result.ADDRESS_MISMATCH, natpmp.RESULTS.known)
        self.assertEqual(set(RESULTS.known), set(Result))

    def test_classes(self) -> None:
        """Unsupported results are permanent; resource shortages are not."""
        self.assertTrue(Result.UNSUPP_OPCODE.unsupported)
        self.assertTrue(Result.UNSUPP_OPCODE.permanent)
        self.assertTrue(Result.NOT_AUTHORIZED.permanent)
        self.assertFalse(Result.NOT_AUTHORIZED.unsupported)
        self.assertFalse(Result.NO_RESOURCES.permanent)
        self.assertFalse(Result.NETWORK_FAILURE.permanent)


class RoundTripTests(SynchronousTestCase):
    @given(requests)
    def test_requests(self, request: Request) -> None:
        """decodeRequest inverts encodeRequest."""
        self.assertEqual(decodeRequest(encodeRequest(request)), request)

    @given(responses)
    def test_responses(self, response: Response) -> None:
        """decodeResponse inverts encodeResponse."""
        self.assertEqual(decodeResponse(encodeResponse(response)), response)


class FuzzTests(SynchronousTestCase):
    @given(st.binary(max_size=1200))
    @example(b"\x02\x81\x00\x00")
    @example(b"\x00\x80\x00\x01")
    def test_randomResponses(self, data: bytes) -> None:
        """Any bytes: a response or a ParseError, never another exception."""
        with contextlib.suppress(ParseError):
            decodeResponse(data)

    @given(st.binary(max_size=1200))
    def test_randomRequests(self, data: bytes) -> None:
        """Any bytes given to decodeRequest: a request or a ParseError."""
        with contextlib.suppress(ParseError):
            decodeRequest(data)

    @given(responses, st.integers(0, 63), st.integers(0, 255))
    def test_mutatedResponses(self, response: Response, index: int, value: int) -> None:
        """One byte changed in a valid response: still only ParseError escapes."""
        data = bytearray(encodeResponse(response))
        data[index % len(data)] = value
        with contextlib.suppress(ParseError):
            decodeResponse(bytes(data))


class EpochRuleTests(SynchronousTestCase):
    """§8.5 epoch validation."""

    def check(self, last: tuple[int, float], new: tuple[int, float]) -> bool:
        return epochInvalid(EpochSample(*last), EpochSample(*new))

    def test_steady(self) -> None:
        """Epoch and clock advancing together is valid."""
        self.assertFalse(self.check((1000, 0.0), (1060, 60.0)))

    def test_backwardsOneSecond(self) -> None:
        """Falling back by 1 s is tolerated, by 2 s is not."""
        self.assertFalse(self.check((1000, 0.0), (999, 0.0)))
        self.assertTrue(self.check((1000, 0.0), (998, 0.0)))

    def test_serverFast(self) -> None:
        """The server's delta may exceed ours by 2 s plus 1/16, no more."""
        self.assertFalse(self.check((0, 0.0), (68, 62.0)))
        self.assertTrue(self.check((0, 0.0), (68, 61.0)))

    def test_serverSlow(self) -> None:
        """Our delta may exceed the server's by 2 s plus 1/16, no more."""
        self.assertFalse(self.check((0, 0.0), (60, 66.0)))
        self.assertTrue(self.check((0, 0.0), (60, 66.5)))

    def test_restart(self) -> None:
        """A restarted gateway (epoch 0 after a minute) is invalid."""
        self.assertTrue(self.check((500, 0.0), (3, 60.0)))


class ScheduleTests(SynchronousTestCase):
    """§8.1.1 retransmission and §11.2.1 renewal timing."""

    def test_retransmissions(self) -> None:
        """3 s, doubling, capped at 1024 s, never ending."""
        waits = list(itertools.islice(retransmissions(lambda: 0.5), 12))
        self.assertEqual(waits, [3, 6, 12, 24, 48, 96, 192, 384, 768, 1024, 1024, 1024])

    def test_jitter(self) -> None:
        """Each wait is within ±10 % of its nominal value."""
        low = list(itertools.islice(retransmissions(lambda: 0.0), 3))
        high = list(itertools.islice(retransmissions(lambda: 1.0), 3))
        for got, want in zip(low, [2.7, 5.4, 10.8], strict=True):
            self.assertAlmostEqual(got, want)
        for got, want in zip(high, [3.3, 6.6, 13.2], strict=True):
            self.assertAlmostEqual(got, want)

    def test_jitterDoesNotCompound(self) -> None:
        """The doubling is of the nominal wait, so the cap holds with jitter."""
        waits = list(itertools.islice(retransmissions(lambda: 1.0), 15))
        self.assertAlmostEqual(max(waits), 1024 * 1.1)

    def test_probe(self) -> None:
        """The first request: again after ~3 s, given up at 5 s."""
        self.assertEqual(probeWaits(lambda: 0.5), [3.0, 2.0])
        self.assertAlmostEqual(sum(probeWaits(lambda: 1.0)), 5.0)

    def test_renewalPoint(self) -> None:
        """Renewal at a uniformly random point from 1/2 to 5/8 of the lifetime."""
        self.assertEqual(renewalPoint(120, lambda: 0.0), 60)
        self.assertEqual(renewalPoint(120, lambda: 1.0), 75)

    def test_renewalRetries(self) -> None:
        """Retries at 3/4, 7/8, 15/16… at least 4 s apart, given up at expiry."""
        waits = renewalWaits(0, 120, 67.5)
        sends = list(itertools.accumulate([67.5, *waits[:-1]]))
        self.assertEqual(sends, [67.5, 90, 105, 112.5, 118.125])
        self.assertEqual(sum(waits) + 67.5, 120)

    def test_renewalLate(self) -> None:
        """Started with under 4 s left: one send, given up at expiry."""
        self.assertEqual(renewalWaits(0, 120, 117), [3])

    def test_renewalGap(self) -> None:
        """Short lifetimes never bring sends closer than 4 s."""
        for lifetime in (8, 20, 60, 120, 3600):
            waits = renewalWaits(0, lifetime, lifetime / 2)
            self.assertTrue(all(w >= 4 for w in waits[:-1]), (lifetime, waits))

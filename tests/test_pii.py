"""PII detection and redaction: every entity type's positives and key negatives, overlap resolution,
redaction styles and counts, argument errors, and accuracy on the hand-labelled benchmark set."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from forgeml.data.pii import ENTITY_TYPES, Entity, detect, redact, redact_texts

LABELLED = Path(__file__).parent.parent / "benchmarks" / "pii_labelled.jsonl"


def found(text: str, types: list[str] | None = None) -> list[tuple[str, str]]:
    return [(entity.type, entity.text) for entity in detect(text, types)]


POSITIVES = [
    ("EMAIL", "write to jane.doe@example.com, thanks", "jane.doe@example.com"),
    ("EMAIL", "From: Marco <m.rossi+news@mail.example.org>", "m.rossi+news@mail.example.org"),
    ("EMAIL", "forward to 'ops-team@example.net' now", "ops-team@example.net"),
    ("EMAIL", "user=BOB.JONES@EXAMPLE.COM status=active", "BOB.JONES@EXAMPLE.COM"),
    ("PHONE", "call me at (202) 555-0143 after 5pm", "(202) 555-0143"),
    ("PHONE", "Toll free: 1-800-555-0199", "1-800-555-0199"),
    ("PHONE", "Tel: +44 (0)20 7946 0123", "+44 (0)20 7946 0123"),
    ("PHONE", "our London office: 020 7946 0958", "020 7946 0958"),
    ("PHONE", "Appelez le 06 12 34 56 78 demain", "06 12 34 56 78"),
    ("PHONE", "Zentrale +49 30 1234567, Durchwahl -12", "+49 30 1234567"),
    ("PHONE", "Tel. 030/1234567 (Mo-Fr)", "030/1234567"),
    ("PHONE", "from abroad dial 0044 20 7946 0411", "0044 20 7946 0411"),
    ("PHONE", "WhatsApp: +12125550188", "+12125550188"),
    ("PHONE", "Handy: 0176 12345678", "0176 12345678"),  # unusual grouping, accepted next to "Handy"
    ("PHONE", "call me on 07700900123", "07700900123"),  # unbroken, accepted next to "call"
    ("CREDIT_CARD", "My card is 4111 1111 1111 1111 exp 12/27", "4111 1111 1111 1111"),
    ("CREDIT_CARD", "Card: 5555-5555-5555-4444", "5555-5555-5555-4444"),
    ("CREDIT_CARD", "Amex 3782 822463 10005 declined", "3782 822463 10005"),
    ("CREDIT_CARD", "pay with 6011000990139424", "6011000990139424"),
    ("CREDIT_CARD", "JCB 3530 1113 3330 0000", "3530 1113 3330 0000"),
    ("CREDIT_CARD", "diners 38520000023237", "38520000023237"),
    ("CREDIT_CARD", "Mastercard 2-series 2223 0031 2200 3222", "2223 0031 2200 3222"),
    ("IBAN", "Bitte auf DE89 3704 0044 0532 0130 00 überweisen", "DE89 3704 0044 0532 0130 00"),
    ("IBAN", "IBAN: GB29NWBK60161331926819", "GB29NWBK60161331926819"),
    ("IBAN", "IBAN: GB29-NWBK-6016-1331-9268-19", "GB29-NWBK-6016-1331-9268-19"),
    ("IBAN", "Konto NO93 8601 1117 947, takk", "NO93 8601 1117 947"),
    ("IP_ADDRESS", "Failed login from 192.168.1.10.", "192.168.1.10"),
    ("IP_ADDRESS", "client 2001:db8::ff00:42:8329 connected", "2001:db8::ff00:42:8329"),
    ("IP_ADDRESS", "listening on [2001:db8::1]:443", "2001:db8::1"),
    ("IP_ADDRESS", "mapped ::ffff:192.0.2.128 seen", "::ffff:192.0.2.128"),
    ("URL", "Track it at https://example.com/orders/12345.", "https://example.com/orders/12345"),
    ("URL", "(see www.example.org/faq)", "www.example.org/faq"),
    ("URL", "wiki https://en.example.org/wiki/Foo_(bar)", "https://en.example.org/wiki/Foo_(bar)"),
    ("US_SSN", "SSN: 219-09-9999", "219-09-9999"),
    ("US_SSN", "ssn 345 67 8901", "345 67 8901"),  # spaces only next to "SSN"
    ("UK_NINO", "NI number: AB 12 34 56 C", "AB 12 34 56 C"),
    ("UK_NINO", "National Insurance JG103759A", "JG103759A"),
]


@pytest.mark.parametrize(("kind", "text", "expected"), POSITIVES)
def test_each_type_is_found(kind: str, text: str, expected: str) -> None:
    assert found(text) == [(kind, expected)]


NEGATIVES = [
    "You can reach me at user at example dot com",  # obfuscated address
    "Send logs to admin@localhost when it fails",  # no TLD
    "The asset icon@2x.png failed to load",  # file name, not an address
    "Order #100245781234 has shipped",  # long order number
    "Meeting moved to 2024-03-15 at 10:30",  # date and time
    "Total: $1,299.99 incl. tax, paid 15/01/2024",  # price and date
    "We opened in 1999 and moved in 2004",  # years
    "Upgrade to v2.10.3.4 fixes the crash",  # version, not an IPv4
    "version 4.3.2.1 released",  # version, not an IPv4
    "ISBN 978-3-16-148410-0 and ISBN 0-306-40615-2",
    "Your PIN is 4821; call 555-0134",  # too short for a phone number
    "Lottery numbers this week: 04 11 23 35 42 49",
    "Kundennummer 0815-4711-42",
    "Card 4587 7065 8948 1132 is Luhn-invalid",
    "Gift card 1673 0024 5892 1525 (Luhn-valid, no card issuer)",
    "IMEI 490154203237518",  # Luhn-valid, wrong length for its prefix
    "IBAN DE74 2646 4460 4956 6053 66 bounced (wrong check digits)",
    "Account DE89 3704 0044 0532 0130 is incomplete",
    "Invalid address 256.1.1.1 and 192.168.1.300",
    "The job ran at 12:30:45; MAC 00:1A:2B:3C:4D:5E",
    "broken link http:/example.com and just www",
    "SSN 000-12-3456, 666-12-3456, 912-34-5678, 123-00-4567, 123-45-0000",
    "ZIP 12345-6789, part 123-456-789",
    "NI number GB 12 34 56 A is not allocated; AB123456E has an invalid suffix",
    "Car registration AB12 CDE, postcode SW1A 1AA",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_key_negatives_are_left_alone(text: str) -> None:
    assert found(text) == []


def test_entities_are_sorted_non_overlapping_with_offsets() -> None:
    text = "Mail jo@example.com or call +44 20 7946 0321; card 4111111111111111."
    entities = detect(text)
    assert [e.type for e in entities] == ["EMAIL", "PHONE", "CREDIT_CARD"]
    for entity in entities:
        assert text[entity.start : entity.end] == entity.text
    assert all(a.end <= b.start for a, b in itertools.pairwise(entities))
    with pytest.raises(dataclasses.FrozenInstanceError):
        entities[0].type = "URL"  # type: ignore[misc]
    assert entities[0] == Entity("EMAIL", 5, 19, "jo@example.com")


def test_overlaps_keep_the_longer_or_validated_entity() -> None:
    # An e-mail or IP inside a URL stays part of the URL.
    assert found("see https://example.com/u/jane@example.com now") == [
        ("URL", "https://example.com/u/jane@example.com")
    ]
    assert found("admin panel http://192.0.2.10/admin") == [("URL", "http://192.0.2.10/admin")]
    # "0044 0532 0130 00" inside this IBAN has a phone's shape; the IBAN wins.
    assert found("IBAN DE89 3704 0044 0532 0130 00") == [("IBAN", "DE89 3704 0044 0532 0130 00")]
    assert found("mapped ::ffff:192.0.2.128") == [("IP_ADDRESS", "::ffff:192.0.2.128")]


def test_types_restrict_detection_and_resolve_among_themselves() -> None:
    text = "see https://example.com/u/jane@example.com, call 020 7946 0958"
    assert found(text, ["PHONE"]) == [("PHONE", "020 7946 0958")]
    # Asking only for e-mails finds the one inside the URL: redaction never leaks a requested type.
    assert found(text, ["email"]) == [("EMAIL", "jane@example.com")]
    assert found(text, "URL") == [("URL", "https://example.com/u/jane@example.com")]


def test_unknown_type_names_the_allowed_types() -> None:
    with pytest.raises(ValueError, match="unknown PII type 'PASSPORT'") as error:
        detect("x", ["EMAIL", "PASSPORT"])
    for name in ENTITY_TYPES:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="NER model"):
        redact("Jane Doe", types=["PERSON"])
    with pytest.raises(ValueError, match="types is empty"):
        detect("x", [])


def test_redact_tag_and_mask_styles_with_counts() -> None:
    text = "Mail jo@example.com or ann@example.org, call (202) 555-0143."
    tagged, counts = redact(text)
    assert tagged == "Mail [EMAIL] or [EMAIL], call [PHONE]."
    assert counts == Counter({"EMAIL": 2, "PHONE": 1})

    masked, counts = redact(text, style="mask")
    assert len(masked) == len(text)
    assert masked == "Mail ************** or ***************, call **************."
    assert counts == Counter({"EMAIL": 2, "PHONE": 1})

    only_phone, counts = redact(text, types=["PHONE"])
    assert only_phone == "Mail jo@example.com or ann@example.org, call [PHONE]."
    assert counts == Counter({"PHONE": 1})

    assert redact("nothing to see here") == ("nothing to see here", Counter())
    with pytest.raises(ValueError, match="allowed styles: tag, mask"):
        redact(text, style="hash")


def test_redact_texts_handles_none_and_sums_counts() -> None:
    texts = ["jo@example.com", None, "", "card 4111 1111 1111 1111 and bo@example.org", "plain"]
    redacted, counts = redact_texts(texts)
    assert redacted == ["[EMAIL]", "", "", "card [CREDIT_CARD] and [EMAIL]", "plain"]
    assert counts == Counter({"EMAIL": 2, "CREDIT_CARD": 1})
    masked, _ = redact_texts(iter(["ip 10.0.0.1"]), types=["IP_ADDRESS"], style="mask")
    assert masked == ["ip ********"]
    with pytest.raises(ValueError, match="allowed types"):
        redact_texts(["x"], types=["SSN"])


def _load_labelled() -> list[dict]:
    return [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_labelled_set_is_large_and_varied_enough() -> None:
    rows = _load_labelled()
    gold = Counter(entity["type"] for row in rows for entity in row["entities"])
    assert len(rows) >= 250
    assert sum(1 for row in rows if not row["entities"]) >= 80
    assert all(gold[name] >= 40 for name in ("EMAIL", "PHONE", "CREDIT_CARD")), gold
    assert all(gold[name] >= 15 for name in ENTITY_TYPES), gold
    assert all(entity["text"] in row["text"] for row in rows for entity in row["entities"])


def test_precision_and_recall_on_the_labelled_set() -> None:
    tp, fp, fn = Counter(), Counter(), Counter()
    for row in _load_labelled():
        gold = Counter((entity["type"], entity["text"]) for entity in row["entities"])
        predicted = Counter((entity.type, entity.text) for entity in detect(row["text"]))
        for (name, _), count in (predicted & gold).items():
            tp[name] += count
        for (name, _), count in (predicted - gold).items():
            fp[name] += count
        for (name, _), count in (gold - predicted).items():
            fn[name] += count
    for name in ("EMAIL", "PHONE", "CREDIT_CARD"):
        precision = tp[name] / (tp[name] + fp[name])
        recall = tp[name] / (tp[name] + fn[name])
        assert precision >= 0.95 and recall >= 0.95, (name, precision, recall)

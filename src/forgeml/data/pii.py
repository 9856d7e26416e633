"""PII detection and redaction: e-mail addresses, phone numbers, payment cards, IBANs, IP addresses,
URLs, US social security numbers and UK national insurance numbers.

Why not Presidio (principle 3 says call the field's library where one exists): offline, Presidio runs
only its pattern recognizers, on a blank spaCy pipeline (+250 MB installed), and no spaCy English
model for its NER is published on PyPI (a third-party re-upload exists: a supply-chain risk). Its
pattern recognizers are regular expressions plus checksums, so that is what this module is, with the
standard library only: precompiled expressions find candidates, validators keep the real ones --
Luhn and issuer prefixes for cards, ISO 13616 mod-97 and per-country lengths for IBANs, the
`ipaddress` module for IPv4/IPv6, allocation rules for SSNs and NI numbers, and numbering-plan
shapes for phone numbers: international ``+CC``/``00CC`` with an assigned country code, North
American 3-3-4, the common UK/EU groupings with a trunk ``0``, French pairs, Spanish 9-digit and
Brazilian numbers. Other national groupings and unbroken digit runs count only right after a context
word such as "tel", "call" or "Handy" (as Presidio's context words do), so order numbers, dates,
prices and versions are left alone. Known misses and false alarms are listed by the benchmark.

PERSON (names) needs a NER model; none is bundled (none is installable from PyPI), so it is not one
of the pattern types here. `data.pii.ner_model` names one: a forgeml token-classification run directory
(e.g. `forgeml run examples/conll_ner.yaml`; its PER entities) or a local Hugging Face token-classification
checkpoint (e.g. a CoNLL-03 BERT); `find_names` runs it and `redact_texts` takes its spans as PERSON
entities. `benchmarks/pii_accuracy.py` measures precision, recall and throughput of the
pattern types on a hand-labelled set.

Overlaps are resolved once per call, among the requested types: a checksum/structure-validated
entity beats a PHONE (the loosest recognizer, so digits inside an IBAN or card stay part of it), then
the longer span wins (an e-mail or IP inside a URL stays part of the URL), then the order of
`ENTITY_TYPES`. Restricting `types` therefore never hides a requested type behind one not requested:
``redact(text, types=["EMAIL"])`` redacts an address even where it sits inside a URL.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

ENTITY_TYPES: tuple[str, ...] = (
    "EMAIL",
    "PHONE",
    "CREDIT_CARD",
    "IBAN",
    "IP_ADDRESS",
    "URL",
    "US_SSN",
    "UK_NINO",
)
REDACTION_STYLES: tuple[str, ...] = ("tag", "mask")


@dataclass(frozen=True)
class Entity:
    """One detected entity: its type (one of `ENTITY_TYPES`), character offsets and text."""

    type: str
    start: int
    end: int
    text: str


# ---------------------------------------------------------------- e-mail
# The practical subset of RFC 5322 that real addresses use; a quote, `=` or `/` before the local part
# stays outside the match ("user=bob@example.org" -> "bob@example.org", "'ops@example.org'").
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9_.%+-])"
    r"[A-Za-z0-9_%+-][A-Za-z0-9_%+'-]*(?:\.[A-Za-z0-9_%+'-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"([A-Za-z]{2,24})(?![A-Za-z0-9_-]|\.[A-Za-z0-9])"
)
# Asset names such as "icon@2x.png" have the shape of an address; these are file types, not TLDs.
_FILE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "tif", "tiff", "css", "js"})


def _find_emails(text: str) -> Iterator[tuple[int, int]]:
    if "@" not in text:
        return
    for match in _EMAIL.finditer(text):
        if match.group(1).lower() not in _FILE_SUFFIXES:
            yield match.span()


# ---------------------------------------------------------------- URL
_URL = re.compile(r"(?<![\w@.-])(?:https?://|www\.)[^\s<>\"'`{}|\\^]+", re.IGNORECASE)
_URL_HOST = re.compile(r"https?://[\w\[]|www\.[\w-]+\.[A-Za-z]", re.IGNORECASE)
_URL_TRAILING = ".,;:!?*"
_URL_BRACKETS = {")": "(", "]": "["}


def _find_urls(text: str) -> Iterator[tuple[int, int]]:
    if "://" not in text and "ww." not in text and "WW." not in text:
        return
    for match in _URL.finditer(text):
        url = match.group()
        # Sentence punctuation and a closing bracket the URL did not open belong to the prose.
        while url:
            last = url[-1]
            opening = _URL_BRACKETS.get(last)
            if last in _URL_TRAILING or (opening and url.count(opening) < url.count(last)):
                url = url[:-1]
            else:
                break
        if _URL_HOST.match(url):
            yield match.start(), match.start() + len(url)


# ---------------------------------------------------------------- IP addresses
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_VERSION_BEFORE = re.compile(r"(?i)\b(?:v|ver|version|release|build|firmware|fw|rev)\.?\s*$")
# At least two colons in one run of hex digits, colons and dots; `ipaddress` decides the rest
# (times like 12:30:45 and MAC addresses are not valid IPv6).
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:)[0-9A-Fa-f:.]{2,}")


def _find_ips(text: str) -> Iterator[tuple[int, int]]:
    if "." in text:
        for match in _IPV4.finditer(text):
            try:
                ipaddress.IPv4Address(match.group())
            except ValueError:  # octet > 255 or a leading zero
                continue
            if not _VERSION_BEFORE.search(text, max(0, match.start() - 12), match.start()):
                yield match.span()
    if text.count(":") >= 2:
        for match in _IPV6.finditer(text):
            start, end = match.span()
            if end < len(text) and (text[end].isalnum() or text[end] == "_"):
                continue
            candidate = match.group().rstrip(".")
            if candidate.endswith(":") and not candidate.endswith("::"):
                candidate = candidate[:-1]
            try:
                ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            if candidate.strip(":"):
                yield start, start + len(candidate)


# ---------------------------------------------------------------- payment cards
_CARD = re.compile(
    r"(?<![\w.,/+-])"
    r"(?:\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{1,3})?"  # 4-4-4-4, 19-digit cards with a 3-digit tail
    r"|\d{4}([ -])\d{6}\2\d{4,5}"  # Amex 4-6-5, Diners 4-6-4
    r"|\d{13,19})"
    r"(?!\w|[.,-]\d)"
)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card_issuer_ok(digits: str) -> bool:
    """Visa, Mastercard, American Express, Discover, JCB or Diners Club prefix with that scheme's lengths."""
    length = len(digits)
    if digits[0] == "4":
        return length in (13, 16, 19)
    two, three, four, six = int(digits[:2]), int(digits[:3]), int(digits[:4]), int(digits[:6])
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return length == 16
    if two in (34, 37):
        return length == 15
    if four == 6011 or 644 <= three <= 649 or two == 65 or 622126 <= six <= 622925:
        return 16 <= length <= 19
    if 3528 <= four <= 3589:
        return 16 <= length <= 19
    if 300 <= three <= 305 or four == 3095 or two in (36, 38, 39):
        return 14 <= length <= 19
    return False


def _find_cards(text: str) -> Iterator[tuple[int, int]]:
    for match in _CARD.finditer(text):
        digits = match.group().replace(" ", "").replace("-", "")
        if _card_issuer_ok(digits) and _luhn_ok(digits):
            yield match.span()


# ---------------------------------------------------------------- IBAN
# Lengths from the SWIFT IBAN registry; a country not listed here is not accepted.
_IBAN_LENGTHS = {
    **dict.fromkeys(["NO"], 15),
    **dict.fromkeys(["BE"], 16),
    **dict.fromkeys(["DK", "FI", "FK", "FO", "GL", "NL", "SD"], 18),
    **dict.fromkeys(["MK", "SI"], 19),
    **dict.fromkeys(["AT", "BA", "EE", "KZ", "LT", "LU", "MN", "XK"], 20),
    **dict.fromkeys(["CH", "HR", "LI", "LV"], 21),
    **dict.fromkeys(["BG", "BH", "CR", "DE", "GB", "GE", "IE", "ME", "RS", "VA"], 22),
    **dict.fromkeys(["AE", "GI", "IL", "IQ", "OM", "SO", "TL"], 23),
    **dict.fromkeys(["AD", "CZ", "ES", "MD", "PK", "RO", "SA", "SE", "SK", "TN", "VG"], 24),
    **dict.fromkeys(["LY", "PT", "ST"], 25),
    **dict.fromkeys(["IS", "TR"], 26),
    **dict.fromkeys(["BI", "DJ", "FR", "GR", "IT", "MC", "MR", "SM"], 27),
    **dict.fromkeys(["AL", "AZ", "BY", "CY", "DO", "GT", "HU", "LB", "NI", "PL", "SV"], 28),
    **dict.fromkeys(["BR", "EG", "PS", "QA", "UA"], 29),
    **dict.fromkeys(["JO", "KW", "MU"], 30),
    **dict.fromkeys(["MT", "SC"], 31),
    **dict.fromkeys(["LC"], 32),
    **dict.fromkeys(["RU"], 33),
}
_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]{4}){2,7}(?:[ -]?[A-Za-z0-9]{1,4})?(?![A-Za-z0-9])"
)
_IBAN_LETTERS = {ord(letter): str(value) for value, letter in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ", start=10)}


def _iban_checksum_ok(iban: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, the number mod 97 is 1."""
    return int((iban[4:] + iban[:4]).translate(_IBAN_LETTERS)) % 97 == 1


def _find_ibans(text: str) -> Iterator[tuple[int, int]]:
    for match in _IBAN.finditer(text):
        candidate = match.group()
        expected = _IBAN_LENGTHS.get(candidate[:2].upper())
        if expected is None:
            continue
        compact = candidate.replace(" ", "").replace("-", "").upper()
        if len(compact) < expected:
            continue
        end = match.end()
        if len(compact) > expected:  # a following group of letters/digits is not part of it
            cut = seen = 0
            while seen < expected:
                seen += candidate[cut] not in " -"
                cut += 1
            if candidate[cut] not in " -":
                continue
            end = match.start() + cut
            compact = compact[:expected]
        if _iban_checksum_ok(compact):
            yield match.start(), end


# ---------------------------------------------------------------- US SSN
_SSN = re.compile(r"(?<![\w-])(\d{3})([- ]?)(\d{2})\2(\d{4})(?!\w|-\d)")
_SSN_CONTEXT = re.compile(r"(?i)\b(?:ssn|ss#|social security|social)")


def _find_ssns(text: str) -> Iterator[tuple[int, int]]:
    for match in _SSN.finditer(text):
        area, separator, group, serial = match.groups()
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue  # never issued
        # Dashes are the SSN's own shape; "123 45 6789" and "123456789" are SSNs only where the text says so.
        if separator != "-" and not _SSN_CONTEXT.search(text, max(0, match.start() - 30), match.start()):
            continue
        yield match.span()


# ---------------------------------------------------------------- UK national insurance number
# Two letters (first not D, F, I, Q, U, V; second not D, F, I, O, Q, U, V), six digits, A-D.
_NINO = re.compile(
    r"(?<!\w)([A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z])[ -]?\d{2}[ -]?\d{2}[ -]?\d{2}[ -]?[A-D](?!\w)", re.IGNORECASE
)
_NINO_UNALLOCATED = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})


def _find_ninos(text: str) -> Iterator[tuple[int, int]]:
    for match in _NINO.finditer(text):
        if match.group(1).upper() not in _NINO_UNALLOCATED:
            yield match.span()


# ---------------------------------------------------------------- phone numbers
# A run is digit groups (the first may carry "+" or be "(+44)"/"(020)") joined by one separator:
# a space, "-", ".", "/" (optionally spaced) or nothing next to a parenthesised group. A run may not
# start inside a word, a number, an amount, an e-mail or a path.
_PHONE_RUN = re.compile(
    r"(?<![\w+#@$€£¥.,/-])"
    r"(?:\(\+?\d+\)|\+?\d+)"
    r"(?:(?: ?[-./] ?| {1,2}|)(?:\(\+?\d+\)|\d+))*"
)
_PHONE_TOKEN = re.compile(r"\(\+?\d+\)|\+?\d+")
_PHONE_CONTEXT = re.compile(
    r"(?i)\b(?:phone|tel|mobile|mob|cell|call|ring|text|sms|whatsapp|fax|contact|handy|telefon|tél|"
    r"portable|móvil|movil|cellulare|telefono|teléfono|celular|appel|llam|chiam|anruf|ruf|bellen|ligue)"
)


def _phone_context(text: str, start: int) -> bool:
    return _PHONE_CONTEXT.search(text, max(0, start - 40), start) is not None


_MAX_PHONE_GROUPS = 8
# ITU-T E.164 country codes: the one-digit zones, the assigned two-digit codes, and the two-digit
# prefixes under which three-digit codes are assigned ("+353" -> "35").
_COUNTRY_CODES_2 = frozenset(
    str(code)
    for code in (20, 27, *range(30, 35), 36, 39, 40, 41, *range(43, 50), *range(51, 59), *range(60, 67), 81, 82, 84, 86)
) | frozenset(str(code) for code in (*range(90, 96), 98))
_COUNTRY_PREFIXES_3 = frozenset(
    map(str, (21, 22, 23, 24, 25, 26, 29, 35, 37, 38, 42, 50, 59, 67, 68, 69, 80, 85, 87, 88, 96, 97, 99))
)


def _country_code_ok(digits: str, written_apart: bool) -> bool:
    """`digits` starts with an assigned country code; where the writer set it apart ("+44 20 ..."),
    the whole group must be one."""
    if written_apart:
        size = len(digits)
        return (
            (size == 1 and digits in "17")
            or (size == 2 and digits in _COUNTRY_CODES_2)
            or (size == 3 and digits[:2] in _COUNTRY_PREFIXES_3)
        )
    return digits[0] in "17" or digits[:2] in _COUNTRY_CODES_2 or digits[:2] in _COUNTRY_PREFIXES_3


def _looks_like_date(groups: list[str], separators: list[str]) -> bool:
    if len(groups) < 3 or separators[0].strip() != separators[1].strip() or separators[0].strip() not in "./-":
        return False
    first, second, third = groups[:3]
    return len(first) <= 2 and len(second) <= 2 and len(third) in (2, 4) and int(second) <= 12 and int(first) <= 31


def _phone_ok(tokens: list[str], separators: list[str], text: str, start: int) -> bool:
    """Whether these groups, joined by these separators, form a phone number in a known numbering plan."""
    international = tokens[0][0] == "+" or tokens[0][:2] == "(+"
    # Parentheses: the first group, or the second after "+CC" or a leading "1" ("+44 (0)20", "1 (800)").
    for index, token in enumerate(tokens[1:], start=1):
        if "+" in token or (token[0] == "(" and not (index == 1 and (international or tokens[0] == "1"))):
            return False
    slash_at = 1 if international else 0  # "030/1234567": after the area code only
    if any("/" in separator for index, separator in enumerate(separators) if index != slash_at):
        return False
    if any(not separator for index, separator in enumerate(separators) if "(" not in tokens[index] + tokens[index + 1]):
        return False

    if international:
        country = tokens[0].strip("(+)")
        if not _country_code_ok(country, written_apart=len(tokens) > 1 and len(country) <= 3):
            return False
        digits = "".join(
            token.strip("(+)") for index, token in enumerate(tokens) if not (index == 1 and token == "(0)")
        )
        if digits[0] in "17":  # +1 (North America) and +7 (Russia, Kazakhstan) have 10 national digits
            return len(digits) == 11
        return 8 <= len(digits) <= 15 and digits[0] != "0"

    groups = [token.strip("()") for token in tokens]
    digits = "".join(groups)
    sizes = [len(group) for group in groups]
    if len(tokens) == 1:  # unbroken: too much like an order number unless the text says "call", "tel", ...
        national = len(digits) in (10, 11) and digits[0] == "0" and digits[1] != "0"
        north_american = len(digits) == 10 and digits[0] in "23456789"
        if not (national or north_american) or tokens[0][0] == "(":
            return False
        return _phone_context(text, start)
    if digits.startswith("00"):  # international with the 00 exit code: "0044 20 7946 0958"
        country_group = 0 if len(groups[0]) > 2 else 1
        national = digits[2:]
        if country_group + 1 >= len(groups) or (groups[country_group + 1][0] == "0" and not national.startswith("39")):
            return False  # the trunk 0 is dropped after a country code (Italy keeps it)
        country = groups[0][2:] if country_group == 0 else groups[1]
        if not _country_code_ok(country, written_apart=len(country) <= 3):
            return False
        return 8 <= len(national) <= 15 and national[0] != "0"
    if sizes == [3, 3, 4] or (sizes == [1, 3, 3, 4] and groups[0] == "1"):
        return True  # North American: (NXX) NXX-XXXX, optionally with the leading 1
    if tokens[0][0] == "(" and sizes in ([2, 4, 4], [2, 5, 4]) and digits[0] != "0":
        return True  # Brazilian: (11) 91234-5678
    # National numbers: the common groupings count on their own; other groupings of a plausible length
    # only where a word like "tel", "call" or "Handy" comes just before (as Presidio's context words).
    if digits[0] == "0":  # UK/EU national with a trunk prefix
        if not 9 <= len(digits) <= 12 or min(sizes) < 2:
            return False
        if sizes == [2, 2, 2, 2, 2]:  # French "06 12 34 56 78"
            return True
        if _looks_like_date(groups, separators):
            return False
        if len(digits) == 9 and sizes in ([2, 3, 2, 2], [3, 2, 2, 2]):  # Belgian "02 123 45 67"
            return True
        if 10 <= len(digits) <= 11 and len(sizes) <= 3 and sizes[-1] >= 3:
            return True  # UK "020 7946 0958", German "030 12345678", Dutch "06-12345678", Italian "02 1234 5678"
        return _phone_context(text, start)  # "069 123 456 78", "0176 12345678", "030 901820"
    if len(digits) == 9 and digits[0] in "6789":  # Spanish
        if sizes in ([3, 3, 3], [3, 2, 2, 2]) and set(separators) == {" "}:
            return True  # "612 345 678"
        return sizes == [2, 3, 2, 2] and _phone_context(text, start)  # "91 123 45 67"
    return False


def _find_phones(text: str) -> Iterator[tuple[int, int]]:
    for match in _PHONE_RUN.finditer(text):
        run = match.group()
        if len(run) < 7:
            continue
        run_start, run_end = match.span()
        following = text[run_end : run_end + 2]
        if following and (
            following[0].isalnum() or following[0] in "_@" or (following[0] in ".,-" and following[1:].isdigit())
        ):
            continue  # glued to a word or continues as a decimal/amount
        spans = [token.span() for token in _PHONE_TOKEN.finditer(run)]
        tokens = [run[a:b] for a, b in spans]
        separators = [run[spans[k][1] : spans[k + 1][0]] for k in range(len(spans) - 1)]
        # Try the whole run, then starting after each plain space ("Room 12 020 7946 0958").
        for first in range(len(tokens)):
            if first and separators[first - 1].strip():
                continue
            if len(tokens) - first > _MAX_PHONE_GROUPS:
                continue
            start = run_start + spans[first][0]
            if _phone_ok(tokens[first:], separators[first:], text, start):
                yield start, run_end
                break


# ---------------------------------------------------------------- detection and redaction
_RECOGNIZERS: dict[str, Callable[[str], Iterator[tuple[int, int]]]] = {
    "EMAIL": _find_emails,
    "PHONE": _find_phones,
    "CREDIT_CARD": _find_cards,
    "IBAN": _find_ibans,
    "IP_ADDRESS": _find_ips,
    "URL": _find_urls,
    "US_SSN": _find_ssns,
    "UK_NINO": _find_ninos,
}
_NEEDS_DIGIT = frozenset({"PHONE", "CREDIT_CARD", "IBAN", "US_SSN", "UK_NINO"})
_ORDER = {name: index for index, name in enumerate(ENTITY_TYPES)}
_DIGIT = re.compile(r"\d")


def _resolve_types(types: Iterable[str] | None) -> tuple[str, ...]:
    """Validated, upper-cased entity types in `ENTITY_TYPES` order; None means all of them."""
    if types is None:
        return ENTITY_TYPES
    if isinstance(types, str):
        types = [types]
    wanted = set()
    for name in types:
        upper = str(name).upper()
        if upper not in _RECOGNIZERS:
            hint = " (names need a NER model: set data.pii.ner_model)" if upper == "PERSON" else ""
            raise ValueError(f"unknown PII type {name!r}{hint}; allowed types: {', '.join(ENTITY_TYPES)}")
        wanted.add(upper)
    if not wanted:
        raise ValueError(f"types is empty; pass None for all types or some of: {', '.join(ENTITY_TYPES)}")
    return tuple(name for name in ENTITY_TYPES if name in wanted)


def _detect(text: str, types: tuple[str, ...], names: Iterable[tuple[int, int]] = ()) -> list[Entity]:
    has_digit = _DIGIT.search(text) is not None
    # Names found by a NER model rank after every pattern type: a validated number inside a "name" wins.
    candidates = [(False, start - end, len(_ORDER), start, end, "PERSON") for start, end in names]
    for name in types:
        if not has_digit and name in _NEEDS_DIGIT:
            continue
        for start, end in _RECOGNIZERS[name](text):
            candidates.append((name == "PHONE", start - end, _ORDER[name], start, end, name))
    if not candidates:
        return []
    candidates.sort()
    kept: list[tuple[int, int, str]] = []
    for *_, start, end, name in candidates:
        if all(end <= other_start or start >= other_end for other_start, other_end, _ in kept):
            kept.append((start, end, name))
    kept.sort()
    return [Entity(name, start, end, text[start:end]) for start, end, name in kept]


def detect(text: str, types: Iterable[str] | None = None) -> list[Entity]:
    """Find PII in `text`: non-overlapping entities sorted by start.

    `types` limits the search to some of `ENTITY_TYPES` (case-insensitive; default all). Where two
    candidates overlap, a validated entity beats a phone number and then the longer span wins (an
    e-mail inside a URL is part of the URL). Raises ValueError naming the allowed types for an
    unknown one.
    """
    return _detect(text, _resolve_types(types))


def _check_style(style: str) -> None:
    if style not in REDACTION_STYLES:
        raise ValueError(f"unknown redaction style {style!r}; allowed styles: {', '.join(REDACTION_STYLES)}")


def _redact(
    text: str, types: tuple[str, ...], style: str, counts: Counter, names: Iterable[tuple[int, int]] = ()
) -> str:
    entities = _detect(text, types, names)
    if not entities:
        return text
    pieces = []
    position = 0
    for entity in entities:
        pieces.append(text[position : entity.start])
        pieces.append(f"[{entity.type}]" if style == "tag" else "*" * (entity.end - entity.start))
        position = entity.end
        counts[entity.type] += 1
    pieces.append(text[position:])
    return "".join(pieces)


def redact(text: str, types: Iterable[str] | None = None, style: str = "tag") -> tuple[str, Counter]:
    """Replace each detected entity and count them per type.

    style "tag" writes the type in brackets (``jane@example.com`` -> ``[EMAIL]``); "mask" writes as
    many ``*`` as the entity has characters, so offsets into the text stay valid.
    """
    _check_style(style)
    counts: Counter = Counter()
    return _redact(text, _resolve_types(types), style, counts), counts


def redact_texts(
    texts: Iterable[str | None],
    types: Iterable[str] | None = None,
    style: str = "tag",
    names: list[list[tuple[int, int]]] | None = None,
) -> tuple[list[str], Counter]:
    """`redact` over many texts (None becomes ""), with the counts summed over all of them.

    `names` (from `find_names`, one list of character spans per text) adds PERSON entities; with
    them, "PERSON" may be one of `types` (alone, it redacts names only).
    """
    _check_style(style)
    if names is not None and types is not None:
        types = [t for t in ([types] if isinstance(types, str) else types) if str(t).upper() != "PERSON"]
    resolved = _resolve_types(types) if types != [] else ()
    counts: Counter = Counter()
    texts = ["" if text is None else str(text) for text in texts]
    spans = names if names is not None else [()] * len(texts)
    if len(spans) != len(texts):
        raise ValueError(f"names: one list of spans per text expected, got {len(spans)} for {len(texts)} texts")
    redacted = [_redact(text, resolved, style, counts, found) for text, found in zip(texts, spans, strict=True)]
    return redacted, counts


# ---------------------------------------------------------------- person names (optional NER model)
PERSON_LABELS = frozenset({"PER", "PERSON"})


@functools.lru_cache(maxsize=2)
def _ner_pipeline(model: str):
    from transformers import pipeline

    from forgeml.models.hf import quiet_loading

    try:
        with quiet_loading():
            return pipeline("token-classification", model=model, aggregation_strategy="simple", device="cpu")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the NER model {model!r}: {error}") from None


@functools.lru_cache(maxsize=2)
def _forgeml_tagger(run_dir: str):
    """A forgeml token-classification run's model (its files verified against the run's manifest)."""
    from forgeml.api import Predictor

    predictor = Predictor(run_dir)
    if predictor.task.name != "token-classification":
        raise ValueError(f"NER model {run_dir}: a {predictor.task.name} run, not a token-classification one")
    return predictor


def _is_forgeml_run(model: str) -> bool:
    from forgeml.errors import ForgeError
    from forgeml.workspace import resolve_run_path

    try:
        path = resolve_run_path(model)
    except ForgeError:  # a registry reference that names no run, or `name/latest` with no finished run
        return False
    return (path / "config.yaml").is_file() and (path / "model" / "task.json").is_file()


def find_names(texts: list[str], model: str, batch_size: int = 32) -> list[list[tuple[int, int]]]:
    """Character spans of person names per text, found by a token-classification `model`: a forgeml
    token-classification run directory, or a local Hugging Face checkpoint.

    Any model whose labels tag persons as PER or PERSON (B-/I- prefixed or not) works.
    """
    if _is_forgeml_run(model):
        predictor = _forgeml_tagger(str(model))
        found = predictor.predict(texts, batch_size) if texts else []
        return [
            [(e["start"], e["end"]) for e in entities if e["entity"].upper() in PERSON_LABELS] for entities in found
        ]
    finder = _ner_pipeline(model)
    spans: list[list[tuple[int, int]]] = [[] for _ in texts]
    todo = [i for i, text in enumerate(texts) if text.strip()]
    found = finder([texts[i] for i in todo], batch_size=batch_size) if todo else []
    for index, entities in zip(todo, found, strict=True):
        spans[index] = [
            (int(e["start"]), int(e["end"]))
            for e in entities
            if str(e.get("entity_group", "")).upper() in PERSON_LABELS and e.get("start") is not None
        ]
    return spans

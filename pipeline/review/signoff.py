"""The sign-off record: an in-toto Statement (v1) whose subjects are the SHA-256 digests of what was reviewed and
whose predicate is the reviewer's decision, in a DSSE envelope signed with Ed25519.

Signing follows the DSSE protocol (v1.0.0): the signature is over
PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body, LEN the ASCII decimal byte length, so a
signature over one payload type can never be replayed as another. docs/architecture.md (Human sign-off) says why
this format.

The report files carry the sign-offs themselves (a block rewritten by every sign-off), so their digest leaves that
block out: a sign-off never voids the one before it, and any other edit does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pydantic import ValidationError

from pipeline import PipelineError
from pipeline.contracts import Check, Release, SignoffPredicate, Waiver
from pipeline.review.reviewers import Reviewer, Reviewers, key_id, public_line, raw_key, verify_signature

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
PREDICATE_TYPE = "urn:mae-governance-pipeline:signoff:v1"
# the sign-off block of report.md, model_card.md and report.html (the renderer keeps these anchors)
BLOCK_START, BLOCK_END = '<a id="signoff"></a>', '<a id="signoffend"></a>'
REVIEWED = "the file without its sign-off block (between <a id=\"signoff\"></a> and <a id=\"signoffend\"></a>; " \
           "for release.json, without its review member)"
WAIVABLE = ("fail", "inconclusive")


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's Pre-Authentication Encoding."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def without_block(data: bytes) -> bytes:
    """A report file's bytes without what lies between the sign-off markers (the markers stay)."""
    start, end = BLOCK_START.encode(), BLOCK_END.encode()
    head, found, rest = data.partition(start)
    if not found:
        return data
    _, found, tail = rest.partition(end)
    return head + start + (end + tail if found else b"")


def reviewed_digest(path: Path) -> str:
    """The digest a sign-off takes of a report file: the sign-off block (or release.json's review) left out."""
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            document = json.loads(data)
        except ValueError:
            return sha256_bytes(data)
        if isinstance(document, dict):
            document.pop("review", None)
        data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return sha256_bytes(without_block(data))


# ---------------------------------------------------------------- the statement and its envelope

def statement(subjects: dict[str, dict[str, str]], predicate: SignoffPredicate) -> bytes:
    """The serialized in-toto Statement: one ResourceDescriptor per subject (name -> digest set)."""
    document = {"_type": STATEMENT_TYPE,
                "subject": [{"name": name, "digest": digest} | (
                    {"annotations": {"digestOf": REVIEWED}} if name.startswith("governance/") and
                    not name.endswith(".csv") else {}) for name, digest in sorted(subjects.items())],
                "predicateType": PREDICATE_TYPE, "predicate": predicate.model_dump(mode="json")}
    return json.dumps(document, sort_keys=True, indent=1).encode("utf-8")


def sign(body: bytes, private) -> dict:
    """A DSSE envelope of `body`, signed with the reviewer's Ed25519 key."""
    signature = private.sign(pae(PAYLOAD_TYPE, body))
    return {"payload": base64.b64encode(body).decode("ascii"), "payloadType": PAYLOAD_TYPE,
            "signatures": [{"keyid": key_id(raw_key(public_line(private))),
                            "sig": base64.b64encode(signature).decode("ascii")}]}


def _b64(value: str) -> bytes:
    """Standard or URL-safe base64, as DSSE verifiers must accept both."""
    value = value.strip()
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)) if re.search(r"[-_]", value) \
        else base64.b64decode(value, validate=True)


@dataclass(frozen=True)
class Opened:
    """A sign-off read back: who signed (None when no trusted key verifies it), what, and why it does not hold."""

    reviewer: Reviewer | None
    subjects: dict[str, dict[str, str]]
    predicate: SignoffPredicate | None
    problems: list[str]


def open_envelope(data: bytes, reviewers: Reviewers, where: str) -> Opened:
    """Decode a DSSE envelope and verify its signature against the reviewers file. The key id only narrows the
    search (DSSE: it is unauthenticated); the key whose signature verifies is the signer."""
    try:
        envelope = json.loads(data)
        body, kind = _b64(envelope["payload"]), envelope["payloadType"]
        signatures = [(s.get("keyid"), _b64(s["sig"])) for s in envelope["signatures"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return Opened(None, {}, None, [f"{where}: not a DSSE envelope"])
    signer = None
    for keyid, signature in signatures:
        candidates = [r for r in reviewers.reviewers if keyid in (None, r.keyid)]
        signer = next((r for r in candidates if verify_signature(r, signature, pae(kind, body))), None)
        if signer is not None:
            break
    if signer is None:
        known = any(reviewers.by_keyid(k) for k, _ in signatures)
        return Opened(None, {}, None, [f"{where}: " + ("signature does not verify against its key in the "
                                                         "reviewers file" if known else
                                                         "signed with a key the reviewers file does not list")])
    problems = [f"{where}: key of {signer.name} is revoked"] if signer.revoked else []
    if kind != PAYLOAD_TYPE:
        return Opened(signer, {}, None, problems + [f"{where}: payload type {kind!r}, expected {PAYLOAD_TYPE}"])
    try:
        document = json.loads(body)
        assert document["_type"] == STATEMENT_TYPE and document["predicateType"] == PREDICATE_TYPE
        subjects = {s["name"]: dict(s["digest"]) for s in document["subject"]}
        predicate = SignoffPredicate.model_validate(document["predicate"])
    except (ValueError, KeyError, TypeError, AssertionError, ValidationError):
        return Opened(signer, {}, None, problems + [f"{where}: not a sign-off Statement ({PREDICATE_TYPE})"])
    if predicate.reviewer != signer.name:
        problems.append(f"{where}: names reviewer {predicate.reviewer!r} but is signed by {signer.name!r}")
    return Opened(signer, subjects, predicate, problems)


# ---------------------------------------------------------------- waivers

def parse_waiver(text: str, checks: list[Check], today: date) -> Waiver:
    """`CHECK_ID=reason,YYYY-MM-DD` bound to the check's evidence now; refused for a check that does not exist, that
    is neither fail nor inconclusive, or an expiry already past. A check id may itself hold "=" (`group=group_b`):
    the longest id of the release that the text starts with, then "=", is the one named."""
    known = sorted((c.id for c in checks if text.startswith(c.id + "=")), key=len, reverse=True)
    check_id, sep, rest = (known[0], "=", text[len(known[0]) + 1:]) if known else text.partition("=")
    reason, comma, expires = rest.rpartition(",")
    if not (sep and comma and reason.strip()):
        raise PipelineError(f"--waive {text!r}: expected CHECK_ID=reason,YYYY-MM-DD")
    return waiver(check_id.strip(), reason.strip(), expires.strip(), checks, today)


def waiver(check_id: str, reason: str, expires: str, checks: list[Check], today: date) -> Waiver:
    found = next((c for c in checks if c.id == check_id), None)
    if found is None:
        raise PipelineError(f"waiver for {check_id}: no such check in release.json")
    if found.status not in WAIVABLE:
        raise PipelineError(f"waiver for {check_id}: its status is {found.status}; only fail or inconclusive "
                            "checks are waived")
    try:
        day = date.fromisoformat(expires)
    except ValueError:
        raise PipelineError(f"waiver for {check_id}: expiry {expires!r} is not a date (YYYY-MM-DD)") from None
    if day < today:
        raise PipelineError(f"waiver for {check_id}: expiry {day} has passed")
    if not reason:
        raise PipelineError(f"waiver for {check_id}: needs a justification")
    return Waiver(check=check_id, reason=reason, expires=day.isoformat(), status=found.status, value=found.value,
                  interval=found.interval, harmful=found.harmful)


SEVERITY = {"not_applicable": 0, "pass": 0, "inconclusive": 1, "fail": 2}


def waiver_problem(granted: Waiver, release: Release, today: date) -> str | None:
    """Why a waiver no longer holds against today's report: expired, the check gone, or its evidence worse
    (status, or the interval's bound on the harmful side moved further that way)."""
    if date.fromisoformat(granted.expires) < today:
        return f"{granted.check}: waiver expired on {granted.expires}"
    now = next((c for c in release.checks if c.id == granted.check), None)
    if now is None:
        return f"{granted.check}: waived, but release.json has no such check"
    if SEVERITY[now.status] > SEVERITY[granted.status]:
        return f"{granted.check}: status {now.status}, worse than the {granted.status} it was waived at"
    if granted.interval and now.interval and granted.harmful:
        worse = (now.interval[1] > granted.interval[1] if granted.harmful == "higher"
                 else now.interval[0] < granted.interval[0])
        if worse:
            return (f"{granted.check}: interval {list(now.interval)} lies further in the harmful direction than "
                    f"the {list(granted.interval)} it was waived at")
    return None

"""Per-image Content Credentials: images signed here with a throwaway certificate (c2pa-python), each with a
training-and-data-mining value, one tampered and one with a garbled manifest, ingested through the image folder
source; the policy fails closed."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import shutil
import struct
import zlib

import c2pa
import numpy as np
import pandas as pd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from pipeline.params import Policy
from pipeline.policy import RecordFacts, c2pa_decision, c2pa_training
from tests.conftest import ROOT, Workspace, small_params

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`

GOOD = {"photographer": "alice", "taken_at": "2025-03-01T10:00:00", "license": "CC-BY-4.0",
        "consent": "granted", "camera": "phone", "age_band": "under_30", "label": "indoor"}
CREATED = {"label": "c2pa.actions", "data": {"actions": [
    {"action": "c2pa.created", "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"}]}}


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Throwaway test CA")])


def _usage(signer: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=signer, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=not signer, crl_sign=not signer,
                         encipher_only=False, decipher_only=False)


@pytest.fixture(scope="module")
def signer() -> c2pa.Signer:
    """An ES256 signer whose certificate a throwaway CA issued: C2PA refuses a self-signed end-entity certificate,
    and wants digitalSignature and an extended key usage (emailProtection) on it. The CA is on no trust list, so
    an intact manifest validates as `Valid`, not `Trusted`."""
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def certificate(subject, issuer, public, issuer_key, ca: bool):
        built = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
                 .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                 .not_valid_after(now + dt.timedelta(days=30))
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                 .add_extension(_usage(signer=not ca), critical=True)
                 .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))
        if not ca:
            built = (built.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                     .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                    critical=False))
        return built.sign(issuer_key, hashes.SHA256())

    ca = certificate(_name("Test CA"), _name("Test CA"), ca_key.public_key(), ca_key, ca=True)
    leaf = certificate(_name("Test signer"), ca.subject, key.public_key(), ca_key, ca=False)
    chain = leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg=b"es256", sign_cert=chain, private_key=private, ta_url=None))


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def signed(signer: c2pa.Signer, seed: int, assertion: dict | None) -> bytes:
    manifest = {"claim_generator_info": [{"name": "test-camera", "version": "1.0"}], "title": f"{seed}.png",
                "assertions": [CREATED] + ([assertion] if assertion else [])}
    out = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, "image/png", io.BytesIO(png(seed)), out)
    return out.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def garble_manifest(data: bytes) -> bytes:
    """The PNG with its C2PA manifest store (the caBX chunk) damaged inside, the chunk itself still well formed, so
    the image decodes and only the manifest is corrupt."""
    at = data.index(b"caBX") - 4
    length = struct.unpack(">I", data[at:at + 4])[0]
    store = bytearray(data[at + 8:at + 8 + length])
    store[len(store) // 3:len(store) // 3 + 200] = b"\xff" * 200
    return data[:at] + chunk(b"caBX", bytes(store)) + data[at + 12 + length:]


def mining(use: str, label: str = "cawg.training-mining", prefix: str = "cawg") -> dict:
    return {"label": label, "data": {"entries": {f"{prefix}.ai_training": {"use": use},
                                                 f"{prefix}.ai_inference": {"use": "allowed"}}}}


def test_the_policy_reads_the_most_restrictive_training_entry_and_fails_closed():
    assert c2pa_training({"cawg.ai_training": "allowed", "cawg.ai_generative_training": "constrained"}) == "constrained"
    assert c2pa_training({"cawg.data_mining": "notAllowed", "cawg.ai_training": "allowed"}) == "notAllowed"
    assert c2pa_training({"c2pa.ai_training": "allowed"}) == "allowed"
    assert c2pa_training({"cawg.ai_inference": "notAllowed"}) is None, "inference is not training"
    assert c2pa_training({"cawg.ai_training": "maybe"}) == "unknown: cawg.ai_training=maybe"
    assert c2pa_training({"entries": "['allowed']"}).startswith("unknown"), "a malformed assertion is refused"
    policy = Policy.model_validate({**small_params()["policy"], "accept_constrained_permission": False})
    lenient = policy.model_copy(update={"accept_constrained_permission": True})

    def reason(state, training, with_policy=policy):
        return c2pa_decision(RecordFacts("r", "s", "s", "CC0-1.0", "granted", state, training), with_policy).reason

    assert reason(None, None) is None and reason("Valid", "allowed") is None and reason("Trusted", None) is None
    assert reason("Invalid", "allowed") == "c2pa_invalid" and reason("unreadable", None) == "c2pa_unreadable"
    assert reason("Valid", "notAllowed") == "c2pa_training_not_allowed"
    assert reason("Valid", "constrained") == "c2pa_training_constrained"
    assert reason("Valid", "constrained", lenient) is None
    assert reason("Valid", "unknown: cawg.ai_training=maybe") == "c2pa_unknown_permission"


def test_signed_images_are_judged_by_their_own_credentials(workspace: Workspace, signer: c2pa.Signer):
    folder = workspace.root / "raw" / "photos"
    folder.mkdir(parents=True)
    files = {
        "allowed": signed(signer, 1, mining("allowed")),
        "not_allowed": signed(signer, 2, mining("notAllowed")),
        "constrained": signed(signer, 3, mining("constrained")),
        "older_label": signed(signer, 4, mining("notAllowed", "c2pa.training-mining", "c2pa")),
        "unknown_value": signed(signer, 5, mining("maybe")),
        "no_assertion": signed(signer, 6, None),
        "unsigned": png(7),
    }
    original = signed(signer, 8, mining("allowed"))
    edit = chunk(b"tEXt", b"Comment\x00edited after signing")
    files["tampered"] = original[:33] + edit + original[33:]  # after IHDR: still a valid PNG, not the signed one
    files["garbled"] = garble_manifest(signed(signer, 9, mining("allowed")))
    for name, data in files.items():
        (folder / f"{name}.png").write_bytes(data)
    with (folder / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["record_id", "path", *GOOD])
        writer.writeheader()
        writer.writerows({"record_id": name, "path": f"{name}.png", **GOOD} for name in files)
    shutil.copy(ROOT / "data_cards" / "examples" / "photos.yaml", workspace.root / "data_cards" / "photos.yaml")
    params = small_params()
    params["datasets"] = {"photos": {"kind": "image_folder", "source": "raw/photos", "image_size": 16, "channels": 3}}
    params["policy"]["accept_constrained_permission"] = False
    workspace.write_params(params)

    result = workspace.run("ingest", "photos")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = workspace.ingested("photos")
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("record_id")
    quarantine = pd.read_parquet(out / "quarantine.parquet").set_index("record_id")
    counts = json.loads((out / "provenance.json").read_text())["counts"]
    assert counts["read"] == len(files) == counts["accepted"] + counts["quarantined"]
    assert set(manifest.index) == {"allowed", "no_assertion", "unsigned"}
    assert quarantine.reason.to_dict() == {
        "not_allowed": "c2pa_training_not_allowed", "constrained": "c2pa_training_constrained",
        "older_label": "c2pa_training_not_allowed", "unknown_value": "c2pa_unknown_permission",
        "tampered": "c2pa_invalid", "garbled": quarantine.reason["garbled"]}
    assert quarantine.reason["garbled"] in {"c2pa_invalid", "c2pa_unreadable"}
    assert "maybe" in quarantine.detail["unknown_value"]
    assert "Invalid" in quarantine.detail["tampered"] and "mismatch" in quarantine.detail["tampered"].lower()

    kept = manifest.loc["allowed"]
    assert (kept.c2pa_state, kept.c2pa_training) == ("Valid", "allowed"), "intact, signer on no trust list"
    assert kept.c2pa_claim_generator.startswith("test-camera 1.0") and "Test signer" in kept.c2pa_signer
    assert manifest.loc["no_assertion", "c2pa_state"] == "Valid"
    assert manifest.loc["no_assertion", "c2pa_training"] is None
    assert manifest.loc["unsigned", ["c2pa_state", "c2pa_signer"]].isna().all(), "no manifest: today's behaviour"

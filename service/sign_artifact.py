"""``python -m service.sign_artifact``: sign model versions, check them, and
re-stamp versions written before metadata.json carried its digest.

    # sign (the version must pass the loader's checks first):
    python -m service.sign_artifact models/bottle-pwae/8 --ed25519-private-key release.pem
    python -m service.sign_artifact models/bottle-pwae/8 --hmac-key-file hmac.key
    # check as a server with this key would (graph, digest, folder, signature):
    python -m service.sign_artifact --check models/bottle-pwae/8 \\
        --ed25519-public-key release.pub.pem   # or --hmac-key-file hmac.key
    # give a version written before artifact_sha256 existed its digest:
    python -m service.sign_artifact --restamp models/bottle-pwae/8

Signing writes ``signature.json`` beside ``metadata.json`` (service/signing.py);
nothing else in the version changes, so a version can be signed after it was
written, or signed again with a new key. Make an ed25519 key pair with
``openssl genpkey -algorithm ed25519 -out release.pem`` and ``openssl pkey -in
release.pem -pubout -out release.pub.pem``; an HMAC key with ``openssl rand
-hex 32 > hmac.key`` (the server's ``INSPECTION_ARTIFACT_HMAC_KEY`` is the
same text).

``--restamp`` is for versions you trust as they are: it refuses a version
whose graph does not match its metadata, that lies in another version's
folder, or whose metadata already carries a digest it no longer matches (an
edit after export is exactly what the digest is there to show).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from service.artifact import (
    ArtifactError,
    check_graph,
    check_version_folder,
    read_metadata,
    verify_files,
    write_metadata,
)
from service.signing import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
    HmacKey,
    SignatureVerifier,
    Signer,
    VerifyKey,
    write_signature,
)


def add_signer_arguments(ap: argparse.ArgumentParser) -> None:
    """``--hmac-key-file`` / ``--ed25519-private-key``, for every tool that signs."""
    group = ap.add_mutually_exclusive_group()
    group.add_argument(
        "--hmac-key-file", type=Path, help="file holding the shared HMAC key (>= 16 bytes)"
    )
    group.add_argument(
        "--ed25519-private-key", type=Path, help="PEM file of the ed25519 private key"
    )


def signer_from_args(args: argparse.Namespace) -> Signer | None:
    if args.hmac_key_file is not None:
        return HmacKey.from_file(args.hmac_key_file)
    if args.ed25519_private_key is not None:
        return Ed25519PrivateKey.load(args.ed25519_private_key)
    return None


def restamp(version_dir: Path) -> str:
    """Give a version without ``artifact_sha256`` its digest; what was done."""
    metadata = read_metadata(version_dir)
    if metadata.artifact_sha256 is not None:
        verify_files(version_dir)  # a stamp that no longer matches is refused, not renewed
        return f"{version_dir}: already stamped (artifact_sha256 {metadata.artifact_sha256})"
    check_version_folder(version_dir, metadata)
    check_graph(version_dir, metadata)
    stamped = write_metadata(version_dir, metadata)
    verify_files(version_dir)
    return f"{version_dir}: stamped artifact_sha256 {stamped.artifact_sha256}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m service.sign_artifact",
        description="Sign model versions (signature.json beside metadata.json), check them "
        "as the server would, or re-stamp versions written before artifact_sha256.",
    )
    ap.add_argument("version_dirs", type=Path, nargs="+", help="models/<name>/<version>")
    add_signer_arguments(ap)
    ap.add_argument(
        "--restamp",
        action="store_true",
        help="write artifact_sha256 into metadata that lacks it (then sign, given a key)",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="sign nothing: check the versions as a server with the keys given would",
    )
    ap.add_argument(
        "--ed25519-public-key", type=Path, help="with --check: PEM file of the public key"
    )
    args = ap.parse_args(argv)
    try:
        signer = signer_from_args(args)
        if args.check:
            if args.restamp:
                ap.error("--check writes nothing; it does not go with --restamp")
            keys: list[VerifyKey] = []
            if isinstance(signer, HmacKey):  # the shared key checks as it signs
                keys.append(signer)
            elif isinstance(signer, Ed25519PrivateKey):
                keys.append(signer.public_key())
            if args.ed25519_public_key is not None:
                keys.append(Ed25519PublicKey.load(args.ed25519_public_key))
            verifier = SignatureVerifier(tuple(keys)) if keys else None
            for version_dir in args.version_dirs:
                meta = verify_files(version_dir, verifier)
                signed = "signature valid" if verifier is not None else "signature not checked"
                print(f"{version_dir}: ok (artifact_sha256 {meta.artifact_sha256}; {signed})")
            return 0
        if signer is None and not args.restamp:
            ap.error("give a key to sign with (--hmac-key-file or --ed25519-private-key)")
        for version_dir in args.version_dirs:
            if args.restamp:
                print(restamp(version_dir))
            if signer is not None:
                meta = verify_files(version_dir)  # sign only what the loader would accept
                assert meta.artifact_sha256 is not None  # verify_files refuses a missing one
                path = write_signature(version_dir, meta.artifact_sha256, signer)
                print(
                    f"{path}: {signer.algorithm} signature, key id {signer.key_id}, "
                    f"over artifact_sha256 {meta.artifact_sha256}"
                )
    except (ArtifactError, OSError, ValueError) as exc:
        print(f"sign_artifact: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

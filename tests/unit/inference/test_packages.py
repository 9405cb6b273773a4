"""Model package format: manifest validation, digests, unlisted files, signatures, zips."""

from __future__ import annotations

import base64
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from inference.errors import PackageError
from inference.packages import (
    MANIFEST_NAME,
    Manifest,
    extract_zip,
    load_package,
    read_manifest,
    sign_package,
    unsafe_name,
    version_key,
    write_digests,
)
from inference.signing import SIGNATURE_NAME, fingerprint, generate_keypair, public_key
from tests.support.packages import FAT, TISSUE, make_package

DIGEST = "0" * 64


def manifest_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "tiny", "version": "1.0.0", "task": "segmentation", "title": "Tiny",
        "input": {"modality": "CT", "intensity": {"low": -100, "high": 100}, "patch_size": [4, 8, 8]},
        "output": {"segments": [{"label": 1, "name": "Fat", "category": TISSUE.model_dump(),
                                 "type": FAT.model_dump()}]},
        "files": {"model.onnx": DIGEST, "MODEL_CARD.md": DIGEST, "LICENSE": DIGEST},
    }
    data.update(changes)
    return data


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return make_package(tmp_path / "tiny")


# ---- manifest validation ------------------------------------------------------------------------


def test_valid_manifest_data() -> None:
    assert Manifest.model_validate(manifest_data()).name == "tiny"


@pytest.mark.parametrize("name", ["", "Tiny", "-tiny", "tiny model", "a" * 65, "tiny/../x"])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        Manifest.model_validate(manifest_data(name=name))


@pytest.mark.parametrize("version", ["1", "1.0", "v1.0.0", "1.0.0-", "1.0.0 beta"])
def test_bad_versions_refused(version: str) -> None:
    with pytest.raises(ValidationError):
        Manifest.model_validate(manifest_data(version=version))


def test_duplicate_labels_refused() -> None:
    segment = {"label": 1, "name": "Fat", "category": TISSUE.model_dump(), "type": FAT.model_dump()}
    with pytest.raises(ValidationError, match="unique"):
        Manifest.model_validate(manifest_data(output={"segments": [segment, {**segment, "name": "Again"}]}))


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../b", "a\\b", "C:x", ".hidden", "a//b",
                                  "a/./b", "dir/.git/config", "a\nb", MANIFEST_NAME, SIGNATURE_NAME])
def test_unsafe_file_names_refused(name: str) -> None:
    files = {"model.onnx": DIGEST, "MODEL_CARD.md": DIGEST, "LICENSE": DIGEST, name: DIGEST}
    with pytest.raises(ValidationError):
        Manifest.model_validate(manifest_data(files=files))


def test_safe_nested_name_allowed() -> None:
    assert unsafe_name("bundle/configs/metadata.json") is None


@pytest.mark.parametrize("digest", ["0" * 63, "0" * 65, "A" * 64, "g" * 64, ""])
def test_bad_digests_refused(digest: str) -> None:
    with pytest.raises(ValidationError, match="sha256"):
        Manifest.model_validate(manifest_data(files={"model.onnx": digest}))


def test_model_file_must_be_onnx() -> None:
    with pytest.raises(ValidationError, match="ONNX"):
        Manifest.model_validate(manifest_data(model_file="model.pt"))


def test_unknown_manifest_keys_refused() -> None:
    with pytest.raises(ValidationError):
        Manifest.model_validate(manifest_data(run="rm -rf /"))


def test_version_order() -> None:
    versions = ["1.10.0", "1.2.0", "1.2.0-rc1", "0.9.9", "1.2.1"]
    assert sorted(versions, key=version_key) == ["0.9.9", "1.2.0-rc1", "1.2.0", "1.2.1", "1.10.0"]


# ---- loading and tampering ----------------------------------------------------------------------


def test_load_good_package(package: Path) -> None:
    loaded = load_package(package)
    assert loaded.ref == "tiny@1.0.0"
    assert loaded.model_path == package / "model.onnx"
    assert len(loaded.package_hash) == 64
    assert loaded.signed_by is None


def test_tampered_file_refused(package: Path) -> None:
    with (package / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(PackageError, match=r"model\.onnx does not match its sha256"):
        load_package(package)


def test_missing_file_refused(package: Path) -> None:
    (package / "MODEL_CARD.md").unlink()
    with pytest.raises(PackageError, match=r"missing file MODEL_CARD\.md"):
        load_package(package)


@pytest.mark.parametrize("extra", ["evil.py", "sub/payload.pkl", ".hidden"])
def test_unlisted_file_refused(package: Path, extra: str) -> None:
    (package / extra).parent.mkdir(exist_ok=True)
    (package / extra).write_text("print('hi')\n")
    with pytest.raises(PackageError, match="not listed in the manifest"):
        load_package(package)


def test_symlink_refused(package: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").write_text("secret")
    os.symlink(tmp_path / "outside", package / "link")
    with pytest.raises(PackageError, match="symbolic link"):
        load_package(package)


def test_required_files_must_be_listed(package: Path) -> None:
    data = yaml.safe_load((package / MANIFEST_NAME).read_text())
    del data["files"]["LICENSE"]
    (package / "LICENSE").unlink()
    (package / MANIFEST_NAME).write_text(yaml.safe_dump(data))
    with pytest.raises(PackageError, match="no digest for"):
        load_package(package)


def test_manifest_is_data_only(package: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (package / MANIFEST_NAME).write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(PackageError, match="invalid manifest"):
        read_manifest(package)
    assert not marker.exists()


def test_not_a_package(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"no portico-model\.yaml"):
        load_package(tmp_path)


# ---- signatures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_keypair()


def test_good_signature_accepted(package: Path, keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    sign_package(package, private)
    loaded = load_package(package, [public], require_signature=True)
    assert loaded.signed_by == fingerprint(public_key(public))


def test_raw_signature_accepted(package: Path, keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    path = sign_package(package, private)
    path.write_bytes(base64.b64decode(path.read_bytes()))
    assert load_package(package, [public.decode()], require_signature=True).signed_by


def test_unsigned_refused_when_required(package: Path, keys: tuple[bytes, bytes]) -> None:
    with pytest.raises(PackageError, match="unsigned"):
        load_package(package, [keys[1]], require_signature=True)


def test_unsigned_accepted_when_not_required(package: Path, keys: tuple[bytes, bytes]) -> None:
    assert load_package(package, [keys[1]]).signed_by is None


def test_wrong_key_refused(package: Path, keys: tuple[bytes, bytes]) -> None:
    sign_package(package, keys[0])
    _, other = generate_keypair()
    with pytest.raises(PackageError, match="does not verify with any trusted key"):
        load_package(package, [other])


def test_wrong_key_among_several_is_fine(package: Path, keys: tuple[bytes, bytes]) -> None:
    sign_package(package, keys[0])
    _, other = generate_keypair()
    assert load_package(package, [other, keys[1]], require_signature=True).signed_by


def test_manifest_changed_after_signing_refused(package: Path, keys: tuple[bytes, bytes]) -> None:
    sign_package(package, keys[0])
    text = (package / MANIFEST_NAME).read_text().replace("title: Tiny", "title: Tinier")
    (package / MANIFEST_NAME).write_text(text)
    with pytest.raises(PackageError, match="does not verify"):
        load_package(package, [keys[1]])


def test_rewritten_digests_refused_by_signature(package: Path, keys: tuple[bytes, bytes]) -> None:
    """An attacker who swaps a file and rewrites its digest still cannot forge the signature."""
    sign_package(package, keys[0])
    (package / "MODEL_CARD.md").write_text("# Evil\n")
    data = yaml.safe_load((package / MANIFEST_NAME).read_text())
    data["files"] = write_digests(package, ["model.onnx", "MODEL_CARD.md", "LICENSE"])
    (package / MANIFEST_NAME).write_text(yaml.safe_dump(data))
    load_package(package)  # consistent digests, signature not checked without keys
    with pytest.raises(PackageError, match="does not verify"):
        load_package(package, [keys[1]])


def test_garbage_signature_refused(package: Path, keys: tuple[bytes, bytes]) -> None:
    (package / SIGNATURE_NAME).write_text("not a signature")
    with pytest.raises(PackageError, match="64-byte"):
        load_package(package, [keys[1]])


def test_required_without_keys_refused(package: Path, keys: tuple[bytes, bytes]) -> None:
    sign_package(package, keys[0])
    with pytest.raises(PackageError, match="no trusted keys"):
        load_package(package, require_signature=True)


def test_non_ed25519_key_refused() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ValueError, match="not an ed25519"):
        public_key(pem)


# ---- zips ---------------------------------------------------------------------------------------


def _zip(path: Path, entries: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def test_zip_with_wrapper_folder(package: Path, tmp_path: Path) -> None:
    entries = {f"tiny/{p.name}": p.read_bytes() for p in package.iterdir()}
    entries["__MACOSX/tiny/._LICENSE"] = b"junk"
    dest = tmp_path / "out"
    dest.mkdir()
    root = extract_zip(_zip(tmp_path / "p.zip", entries), dest)
    assert load_package(root).ref == "tiny@1.0.0"


@pytest.mark.parametrize("name", ["../evil", "/abs/evil", "a/../../evil", "C:/evil", "a\\..\\evil"])
def test_zip_escape_refused(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(PackageError, match="entry"):
        extract_zip(_zip(tmp_path / "p.zip", {name: b"x"}), dest)
    assert not (tmp_path / "evil").exists()


def test_zip_symlink_refused(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(PackageError, match="symbolic link"):
        extract_zip(_zip(tmp_path / "p.zip", {}, links=("link",)), dest)


def test_zip_size_limit(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(PackageError, match="more than"):
        extract_zip(_zip(tmp_path / "p.zip", {"big": b"\0" * 5000}), dest, max_bytes=1000)


def test_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "p.zip").write_text("nope")
    with pytest.raises(PackageError, match="cannot unpack"):
        extract_zip(tmp_path / "p.zip", tmp_path)

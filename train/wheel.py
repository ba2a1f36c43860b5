"""Build this repo's pure-Python wheel in-process, for offline `pip install --no-index --no-deps`.

Usage:
    python -m train.wheel out=OUT_DIR      # writes OUT_DIR/arena_pref-<version>-py3-none-any.whl

A wheel is a zip of the packages plus `<dist>-<version>.dist-info/{METADATA,WHEEL,RECORD}`,
RECORD listing every file with its urlsafe-base64 sha256 and size. It is written with zipfile and
hashlib only (no pip, setuptools or network), with fixed timestamps so the same code gives the
same bytes. Packages and package data come from pyproject.toml; YAML/JSON files inside the
packages (e.g. infer/throughput.yaml) are package data too.
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import fnmatch
import hashlib
import io
import zipfile
from pathlib import Path

from cli.config import ConfigError, UserError, cli_config, opt, run_cli

REPO = Path(__file__).resolve().parents[1]
DATA_SUFFIXES = (".yaml", ".yml", ".json")
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # earliest zip timestamp: reproducible wheel bytes


class WheelError(UserError, ValueError):
    """A wheel that cannot be built or whose contents do not match its RECORD."""


def project_meta(repo: Path = REPO) -> dict:
    import tomllib

    raw = tomllib.loads((repo / "pyproject.toml").read_text())
    project, tools = raw["project"], raw.get("tool", {}).get("setuptools", {})
    return {
        "name": project["name"],
        "version": project["version"],
        "summary": project.get("description", ""),
        "requires_python": project.get("requires-python", ""),
        "dependencies": project.get("dependencies", []),
        "packages": tools.get("packages", []),
        "package_data": tools.get("package-data", {}),
    }


def package_files(repo: Path, meta: dict) -> list[tuple[str, Path]]:
    """(archive name, source file) for every module and data file of the listed packages."""
    files = []
    for package in meta["packages"]:
        root = repo / package
        patterns = meta["package_data"].get(package, [])
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.suffix == ".py" or path.suffix in DATA_SUFFIXES or any(fnmatch.fnmatch(rel, p) for p in patterns):
                files.append((f"{package}/{rel}", path))
    if not files:
        raise WheelError(f"{repo}: no package files found for packages {meta['packages']}")
    return files


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(out_dir: Path, repo: Path = REPO) -> Path:
    meta = project_meta(repo)
    dist = meta["name"].replace("-", "_")
    info = f"{dist}-{meta['version']}.dist-info"
    metadata = "".join(
        [f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\nSummary: {meta['summary']}\n"]
        + ([f"Requires-Python: {meta['requires_python']}\n"] if meta["requires_python"] else [])
        + [f"Requires-Dist: {dep}\n" for dep in meta["dependencies"]]
    )
    wheel = "Wheel-Version: 1.0\nGenerator: arena-pref train.wheel\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    entries = [(name, path.read_bytes()) for name, path in package_files(repo, meta)]
    entries += [(f"{info}/METADATA", metadata.encode()), (f"{info}/WHEEL", wheel.encode())]
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in entries:
        writer.writerow([name, record_hash(data), len(data)])
    writer.writerow([f"{info}/RECORD", "", ""])
    entries.append((f"{info}/RECORD", record.getvalue().encode()))

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{dist}-{meta['version']}-py3-none-any.whl"
    with zipfile.ZipFile(target, "w") as zf:
        for name, data in entries:
            item = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            item.external_attr = 0o644 << 16
            item.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(item, data)
    check_wheel(target)
    return target


def check_wheel(path: Path) -> int:
    """Every archive member is in RECORD with the right hash and size (and vice versa); returns the count."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise WheelError(f"{path}: not a readable wheel: {err}") from None
    with zf:
        records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise WheelError(f"{path}: expected one .dist-info/RECORD, found {records}")
        rows = {row[0]: row[1:] for row in csv.reader(io.StringIO(zf.read(records[0]).decode())) if row}
        names = set(zf.namelist())
        if names != set(rows):
            raise WheelError(f"{path}: RECORD and archive differ: {sorted(names ^ set(rows))[:10]}")
        for name in names - {records[0]}:
            data = zf.read(name)
            if rows[name] != [record_hash(data), str(len(data))]:
                raise WheelError(f"{path}: {name} does not match its RECORD entry")
    return len(names)


@dataclasses.dataclass
class WheelConfig:
    out: str = opt("", "folder to write the wheel into (created if missing)")


def main(argv: list[str] | None = None) -> None:
    cfg = cli_config(WheelConfig, __doc__, argv)
    if not cfg.out:
        raise ConfigError("out= is required (see --help)")
    target = build_wheel(Path(cfg.out))
    print(f"wrote {target} ({check_wheel(target)} files, RECORD verified)")


if __name__ == "__main__":
    run_cli(main)

"""Generate the Python code for the BrightRun contract.

    python scripts/gen_protos.py           # regenerate sdk/brightrun/v1
    python scripts/gen_protos.py --check   # exit 1 if the checked-in code is stale

Messages come from protoc's Python generator, services from grpcio-tools, and
type stubs (`_pb2.pyi`, `_pb2_grpc.pyi`) from mypy-protobuf, which covers both
messages and the sync/async gRPC stubs. protoc's own `--pyi_out` would write the
same `_pb2.pyi`, so it is not used. Never edit the output by hand.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = Path("brightrun") / "v1"
OUT_ROOT = ROOT / "sdk"

INIT = '''"""Generated protobuf and gRPC code for the brightrun.v1 contract.

Do not edit: regenerate with `python scripts/gen_protos.py`.
"""
'''


def generate(out_root: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    # The mypy-protobuf plugins live next to this interpreter, which may not be on PATH.
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    (out_root / PACKAGE_DIR / "__init__.py").write_text(INIT)
    (out_root / PACKAGE_DIR / "py.typed").write_text("")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the generated code is stale")
    args = parser.parse_args()
    target = OUT_ROOT / PACKAGE_DIR
    if not args.check:
        # Generate aside and swap in only on success: a protoc error must never
        # leave the package empty under everyone importing it.
        with tempfile.TemporaryDirectory(dir=OUT_ROOT) as tmp:
            generate(Path(tmp))
            fresh = Path(tmp) / PACKAGE_DIR
            old = OUT_ROOT / f".{PACKAGE_DIR.name}-old"
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                target.rename(old)
            fresh.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        print(f"generated {sorted(p.name for p in target.iterdir())}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / PACKAGE_DIR
        fresh.mkdir(parents=True)
        generate(Path(tmp))
        cmp = filecmp.dircmp(fresh, target)
        stale = cmp.left_only + cmp.right_only + cmp.diff_files
        if stale:
            print(f"generated code is stale: {sorted(stale)}; run python scripts/gen_protos.py")
            return 1
        # dircmp compares shallowly (size and mtime); confirm byte equality.
        for name in cmp.common_files:
            if (fresh / name).read_bytes() != (target / name).read_bytes():
                print(f"generated code is stale: {name}; run python scripts/gen_protos.py")
                return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

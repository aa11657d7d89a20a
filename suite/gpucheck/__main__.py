"""``python -m suite.gpucheck``: prepare (the carry folder), cpu (the CPU half), command (the
device command), gpu (the GPU half), part (one part of it, used by ``gpu``), check (all of
prepare + size check + CPU half + command: what ``nox -s gpu-check`` runs)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from suite.gpucheck import CARRY, build, carry, parts, tinyllm

ROOT = Path.cwd()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m suite.gpucheck", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    chk = sub.add_parser("check", help="prepare, size check, CPU half, print the command")
    chk.add_argument("--dry-run", action="store_true",
                     help="skip the CPU half (prepare, size check and command only)")
    chk.add_argument("--no-vision", action="store_true", help="leave the vision cells out")
    sub.add_parser("command", help="print the device command and the carry paths")
    gpu = sub.add_parser("gpu", help="the GPU half (on the device machine)")
    gpu.add_argument("--out", required=True, help="output folder (the device's $OUT)")
    gpu.add_argument("--budget", type=float, default=carry.DEVICE_TIMEOUT_S - 15)
    gpu.add_argument("--parts", default=None, help="comma-separated subset of the parts")
    part = sub.add_parser("part", help="one in-process part of the GPU half")
    part.add_argument("name", choices=sorted(parts.PARTS))
    part.add_argument("--out", required=True)
    return p


def print_command() -> str:
    """Print (and return) the device command and the carry paths."""
    cmd = carry.device_command()
    print("gpu-check: run this from the repository root on the device machine "
          f"({len(cmd)} chars, limit {carry.DEVICE_TIMEOUT_S} s):\n\n{cmd}\n")
    print(f"gpu-check: carry (ignored paths sent with the working tree): "
          f"{json.dumps(carry.carry_paths())}")
    print("gpu-check: then copy the returned gpu/*.csv into results/gpu/")
    return cmd


def check(dry_run: bool, vision: bool) -> int:
    """What ``nox -s gpu-check`` runs; 1 when the size check or the CPU half fails."""
    t0 = time.perf_counter()
    found = build.prepare_carry(ROOT, tinyllm.FULL, wheels=True, vision=vision)
    wheels = found["wheels"]
    print(f"gpu-check: imported by the GPU half: {', '.join(found.get('imported', []))}")
    print(f"gpu-check: wheels the image lacks: {found['requirements'] or 'none'} "
          f"({sum(w.stat().st_size for w in wheels) / 2**20:.2f} MiB)")
    print(f"gpu-check: carry prepared in {time.perf_counter() - t0:.0f} s")
    status = 0
    if not dry_run:
        seconds = parts.cpu_half(ROOT, ROOT / "build" / "gpucheck", vision=vision)
        print(f"gpu-check: CPU half: {json.dumps({k: round(v) for k, v in seconds.items()})} s")
    size = carry.size_report(ROOT, ROOT / CARRY)
    ok = size["total"] < size["limit"]
    print(f"gpu-check: tree {size['tree'] / 2**20:.2f} MiB + carry "
          f"{size['carry'] / 2**20:.2f} MiB = {size['total'] / 2**20:.2f} MiB "
          f"({'under' if ok else 'OVER'} the {size['limit'] >> 20} MiB limit)")
    status |= not ok
    print_command()
    return status


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "check":
        return check(args.dry_run, not args.no_vision)
    if args.cmd == "command":
        print_command()
        return 0
    if args.cmd == "part":
        parts.PARTS[args.name](Path(args.out))
        return 0
    names = args.parts.split(",") if args.parts else None
    return parts.gpu_half(ROOT, Path(args.out).resolve() / "gpu", args.budget, names)


if __name__ == "__main__":
    sys.exit(main())

"""Reassemble the x86 witness guest (guestprog/x86/witness.S) with GNU binutils and rewrite
guestprog/x86/code.py: the code bytes and their objdump listing, committed so the project
needs no assembler to run.

    python tools/gen_x86_witness.py           # rewrite code.py
    python tools/gen_x86_witness.py --check   # exit 1 if code.py differs from the source
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "guestprog" / "x86" / "witness.S"
OUTPUT = ROOT / "guestprog" / "x86" / "code.py"
CODE_GPA = 0x1000  # guestprog.x86.CODE_GPA: where the listing's addresses start


def assemble(source: pathlib.Path = SOURCE) -> tuple[bytes, str]:
    """The code bytes and the listing (`as --64`, `objcopy -O binary`, `objdump -d`)."""
    with tempfile.TemporaryDirectory() as tmp:
        obj = pathlib.Path(tmp) / "witness.o"
        binary = pathlib.Path(tmp) / "witness.bin"
        subprocess.run(["as", "--64", "-o", str(obj), str(source)], check=True)
        subprocess.run(
            ["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)], check=True
        )
        dump = subprocess.run(
            ["objdump", "-d", "-M", "intel", f"--adjust-vma={CODE_GPA:#x}", str(obj)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        code = binary.read_bytes()
    # Keep the disassembly only (from the first symbol on), without the object file's name.
    lines = dump.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(">:"))
    listing = "\n".join(line.rstrip() for line in lines[start:]).strip() + "\n"
    return code, listing


def render(code: bytes, listing: str) -> str:
    rows = [code[i : i + 16].hex() for i in range(0, len(code), 16)]
    hex_lines = "\n".join(f'    "{row}"' for row in rows)
    return (
        '"""The x86 witness guest\'s machine code, assembled from witness.S by\n'
        "tools/gen_x86_witness.py (do not edit: rerun it). `LISTING` is its disassembly at\n"
        'the guest-physical address it runs from."""\n'
        "\n"
        f"CODE = bytes.fromhex(\n{hex_lines}\n)\n"
        "\n"
        f'LISTING = """\\\n{listing}"""\n'
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    text = render(*assemble())
    if args.check:
        same = OUTPUT.exists() and OUTPUT.read_text() == text
        print("up to date" if same else f"{OUTPUT} differs from {SOURCE}")
        return 0 if same else 1
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Count the instructions of a compiled GPU kernel's hot loop, per weight, from its SASS.

Without a GPU, the speed of a weight-streaming kernel has one measure: the machine code of its
innermost loop against the GPU's instruction issue budget. This module works on ANY cubin (or
fat binary, object file or executable that ``cuobjdump`` reads), whoever compiled it: Triton
(:mod:`.sass_report` compiles this package's kernels), or nvcc::

    from tacq_kernels.kernels.sass import count_hot_loop, predict, GPUS
    count = count_hot_loop("gemv.cubin", "my_gemv_kernel", weights_per_iteration=128)
    print(count.per_weight, count.classes, count.sources)
    for gpu in GPUS.values():
        if gpu.arch == count.arch:
            print(gpu.name, predict(count, gpu, bytes_per_weight=0.25))  # 2-bit codes

How the hot loop is found. ``cuobjdump -sass`` lists the function's instructions with their
addresses. Every branch whose target is at or before the branch itself is a back edge; the
address range [target, branch] is a loop, and ranges nest. The hot loop is, by default, the
outermost loop that looks most like a decode loop (``loop="auto"``: the most bit-field,
int-to-float, select and MMA instructions; a CSR or epilogue loop can be larger but has few of
them), or the one starting at a given address; a loop nested inside it (an
inner loop the compiler kept, e.g. over a word's bit positions) runs ``inner_trips[depth]``
times per iteration of the hot loop, which the caller must supply because SASS does not state
trip counts reliably. ``loop="kernel"`` counts the whole function, for kernels without a loop
(one tile per program). Forward branches inside the loop are counted as if every path ran
(the report says how many there are).

Per weight. ``weights_per_iteration`` is what ONE THREAD decodes in one iteration of the hot
loop (for a tile [BLOCK_K, BLOCK_N] per iteration over 32 * num_warps threads:
BLOCK_K * BLOCK_N / (32 * num_warps)); every count is divided by it. A warp instruction is
counted once per thread, so the counts compare directly with per-SM thread-instruction rates.

Two views of the same instructions:

* ``classes``: by opcode (FFMA, HFMA2, I2FP, LOP3, SHF, LDG.128, ...); they sum to the total.
* ``sources``: by what the instruction is for, from a def-use walk over one iteration (a
  heuristic, see :func:`_sources`): math (the FMAs), decode (bit extraction from the weight
  words), convert, the loads (weight words, x / tables / scales, index gathers), address
  arithmetic, masks, loop control, shared-memory layout traffic. They sum to the total too.

The throughput tables (:data:`ARCHS`, :data:`GPUS`) and :func:`predict` turn a count into an
issue-bound and a pipe-bound time per weight and a predicted fraction of the bandwidth roofline.
Their sources are in docs/kernels.md section 5; entries not checked against a primary source are
marked unverified there and in :class:`Arch`.
"""

from __future__ import annotations

import bisect
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

# --------------------------------------------------------------------------------------------
# Disassembly and parsing
# --------------------------------------------------------------------------------------------


def cuobjdump_path() -> str:
    """``cuobjdump``: the one shipped with Triton, else the one on PATH."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    path = shutil.which("cuobjdump")
    if path is None:
        raise FileNotFoundError("cuobjdump not found: install Triton (it ships one) or the CUDA toolkit")
    return path


def cuobjdump(binary, *flags: str) -> str:
    """Run ``cuobjdump <flags>`` on a cubin given as bytes or as a path (cubin, fatbin, .o,
    executable) and return its standard output."""
    if isinstance(binary, (bytes, bytearray)):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(binary)
            return cuobjdump(path, *flags)
    result = subprocess.run([cuobjdump_path(), *flags, os.fspath(binary)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"cuobjdump {' '.join(flags)} failed on {binary}: {result.stderr.strip()[:500]}")
    return result.stdout


def disassemble(binary) -> str:
    """``cuobjdump -sass`` of a binary (see :func:`cuobjdump`)."""
    text = cuobjdump(binary, "-sass")
    if "Function :" not in text:
        raise ValueError(f"cuobjdump -sass found no functions in {binary}")
    return text


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: ``address``, optional ``guard`` predicate (``@!P0``), ``opcode`` with
    its modifiers (``LDG.E.128``) and the operand strings."""

    address: int
    guard: str | None
    opcode: str
    operands: tuple[str, ...]

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def modifiers(self) -> tuple[str, ...]:
        return tuple(self.opcode.split(".")[1:])

    def branch_target(self) -> int | None:
        """Target address of a branch (``BRA``, ``CALL.REL.NOINC`` as used to leave loops)."""
        if self.base not in BRANCHES or not self.operands:
            return None
        found = re.fullmatch(r"(0x[0-9a-fA-F]+)", self.operands[-1].strip())
        return int(found[1], 16) if found else None


_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_ARCH = re.compile(r"code for sm_(\d+)")


def _split_operands(text: str) -> tuple[str, ...]:
    """Split at commas that are not inside brackets (``desc[UR4][R2.64]``, ``c[0x0][0x28]``)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return tuple(parts)


def parse_instruction(address: int, text: str) -> Instruction:
    guard = None
    found = re.match(r"(@!?U?P[0-9T])\s+(.*)", text)
    if found:
        guard, text = found[1], found[2]
    opcode, _, rest = text.partition(" ")
    return Instruction(address, guard, opcode, _split_operands(rest))


def parse_sass(text: str) -> dict[tuple[int, str], list[Instruction]]:
    """Functions of a ``cuobjdump -sass`` listing: {(sm version, kernel name): instructions}."""
    functions: dict[tuple[int, str], list[Instruction]] = {}
    arch, current = 0, None
    for line in text.splitlines():
        found = _ARCH.search(line)
        if found:
            arch = int(found[1])
            continue
        found = _FUNCTION.match(line)
        if found:
            current = functions.setdefault((arch, found[1]), [])
            continue
        found = _INSTR.match(line)
        if found and current is not None:
            current.append(parse_instruction(int(found[1], 16), found[2]))
    return functions


def select_function(functions: dict, kernel: str, arch: int | None = None) -> tuple[int, list[Instruction]]:
    """The function named ``kernel`` (exactly, else the one name containing it; e.g. a mangled
    C++ name), of sm version ``arch`` when the binary holds several."""
    keys = [k for k in functions if arch is None or k[0] == arch]
    exact = [k for k in keys if k[1] == kernel]
    chosen = exact or [k for k in keys if kernel in k[1]]
    if len(chosen) != 1:
        names = sorted(f"sm_{a} {n}" for a, n in functions)
        what = "no function" if not chosen else "several functions"
        raise KeyError(f"{what} named {kernel!r} (arch {arch}) in the binary; it holds: {names}")
    key = chosen[0]
    return key[0], functions[key]


# --------------------------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------------------------

BRANCHES = {"BRA", "JMP", "CALL", "BRX", "JMX"}


@dataclass
class Loop:
    """Instructions at addresses [start, end]; ``end`` is the back-edge branch."""

    start: int
    end: int
    children: list[Loop] = field(default_factory=list)

    def contains(self, other: Loop) -> bool:
        return self.start <= other.start and other.end <= self.end and (self.start, self.end) != (other.start, other.end)


def find_loops(instructions: list[Instruction]) -> list[Loop]:
    """The loop forest of a function: one loop per back edge (a branch to an address at or before
    itself; a branch to its own address, the trap after EXIT, is not a loop). Back edges that share
    a target (``continue``-like paths) form one loop that ends at the last of them."""
    ends: dict[int, int] = {}
    for ins in instructions:
        target = ins.branch_target()
        if target is not None and target < ins.address:
            ends[target] = max(ends.get(target, target), ins.address)
    loops = sorted((Loop(s, e) for s, e in ends.items()), key=lambda lp: (lp.start, -lp.end))
    roots: list[Loop] = []
    stack: list[Loop] = []
    for lp in loops:
        while stack and not stack[-1].contains(lp):
            stack.pop()
        (stack[-1].children if stack else roots).append(lp)
        stack.append(lp)
    return roots


def _in_range(instructions, start, end):
    return [ins for ins in instructions if start <= ins.address <= end]


# --------------------------------------------------------------------------------------------
# Classes (by opcode)
# --------------------------------------------------------------------------------------------

MATH = {"FFMA", "FFMA32I", "FMUL", "FMUL32I", "FADD", "FADD32I", "FMNMX", "HFMA2", "HMUL2", "HADD2", "HMNMX2",
        "DFMA", "DADD", "DMUL"}
MMA = {"HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BMMA", "DMMA", "UTCHMMA", "UTCQMMA"}
CONVERSIONS = {"I2F", "I2FP", "F2F", "F2FP", "F2I", "F2IP", "I2I", "I2IP", "FRND"}
GLOBAL_LOADS = {"LDG", "LD"}
SHARED_LOADS = {"LDS", "LDSM"}
ASYNC_COPIES = {"LDGSTS", "UBLKCP", "UTMALDG"}
STORES = {"STG", "STS", "ST", "STL", "STSM", "RED", "REDG"}
LOCAL = {"LDL", "STL"}
SYNCS = {"BAR", "DEPBAR", "LDGDEPBAR", "ARRIVES", "SYNCS", "WARPSYNC", "MEMBAR", "FENCE", "WARPGROUP", "ERRBAR"}
CONTROL = BRANCHES | {"EXIT", "RET", "BSSY", "BSYNC", "NOP", "YIELD", "BREAK", "BMOV"}
BIT_OPS = {"SHF", "SHL", "SHR", "LOP3", "LOP", "LOP32I", "SGXT", "BFE", "BFI", "BMSK", "BREV", "FLO", "POPC"}
NO_DEST = STORES | SYNCS | CONTROL | ASYNC_COPIES | {"CCTL", "UTMASTG"}


def access_bits(ins: Instruction) -> int:
    """Bits one thread moves with a load or store (``LDG.E.128``: 128, ``LDS.U16``: 16; else 32)."""
    for mod, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if mod in ins.modifiers:
            return bits
    return 32


def instruction_class(ins: Instruction) -> str:
    """The class an instruction is counted in (the report's columns); every opcode has one."""
    base, mods = ins.base, ins.modifiers
    if base in ("FFMA", "FFMA32I"):
        return "FFMA"
    if base in ("FMUL", "FMUL32I", "FADD", "FADD32I", "FMNMX"):
        return "FMUL/FADD"
    if base == "HADD2" and "F32" in mods:
        return "HADD2.F32"  # fp16 -> fp32 conversion on sm_80+
    if base == "HFMA2" and "MMA" in mods and all(op.lstrip("-") in ("RZ", "0") for op in ins.operands[1:]):
        return "MOV"  # HFMA2.MMA R2, -RZ, RZ, 0, 0: a register cleared on the FMA pipe
    if base in ("HFMA2", "HMUL2", "HADD2", "HMNMX2"):
        return "HFMA2"
    if base in ("I2F", "F2F", "F2I", "I2I", "I2FP", "F2FP", "FRND", "F2IP", "I2IP"):
        return base
    if base in ("LOP3", "LOP", "LOP32I"):
        return "LOP3"
    if base in ("SHF", "SHL", "SHR"):
        return "SHF"
    if base in ("SGXT", "BFE", "BFI", "BMSK"):
        return "SGXT/BFE"
    if base == "PRMT":
        return "PRMT"
    if base in ("LEA", "ISCADD"):
        return "LEA"
    if base in ("IMAD", "IADD3", "IADD", "VIADD", "IMUL", "XMAD", "IABS", "IMNMX", "VIMNMX", "VIADDMNMX"):
        return "MOV" if base == "IMAD" and "MOV" in mods else "IMAD/IADD"
    if base in ("MOV", "MOV32I", "CS2R"):
        return "MOV"
    if base in ("ISETP", "FSETP", "HSETP2", "PSETP", "PLOP3", "ICMP", "FCHK"):
        return "ISETP"
    if base in ("SEL", "FSEL"):
        return "SEL/FSEL"
    if base in GLOBAL_LOADS | SHARED_LOADS | ASYNC_COPIES | STORES | LOCAL:
        if base in LOCAL:
            return base + " (spill)"
        if base == "LDSM":
            return "LDSM"
        return f"{base}.{access_bits(ins)}"
    if base in MMA:
        return base
    if base == "MUFU":
        return "MUFU"
    if base in ("SHFL", "VOTE", "MATCH", "REDUX"):
        return "SHFL/VOTE"
    if base == "BAR":
        return "BAR"
    if base in SYNCS:
        return "DEPBAR/sync"
    if base in CONTROL:
        return "BRA/control"
    if base in ("R2UR", "S2UR") or base.startswith("U"):
        return "uniform"
    if base in ("S2R", "LDC", "P2R", "R2P"):
        return base if base in ("S2R", "LDC") else "P2R/R2P"
    return "other"


# --------------------------------------------------------------------------------------------
# Sources (what each instruction is for): a def-use walk over one iteration
# --------------------------------------------------------------------------------------------

_REG = re.compile(r"(?<![A-Za-z0-9_])(U?R)(\d+)((?:\.64)?)")
_PRED = re.compile(r"(?<![A-Za-z0-9_])(U?P)([0-6])(?![0-9])")


def _regs(text: str) -> list[str]:
    out = []
    for kind, num, wide in _REG.findall(text):
        out.append(f"{kind}{num}")
        if wide:
            out.append(f"{kind}{int(num) + 1}")
    return out + [f"{k}{n}" for k, n in _PRED.findall(text)]


def _dest_width(ins: Instruction) -> int:
    base, mods = ins.base, ins.modifiers
    if base in MMA:
        if base.endswith("GMMA"):
            shape = re.match(r"(\d+)x(\d+)x(\d+)", mods[0]) if mods else None
            return int(shape[1]) * int(shape[2]) // 128 if shape else 64
        return 4 if "F32" in mods or "S32" in mods else 2
    if base == "LDSM":
        return int(mods[-1]) if mods and mods[-1].isdigit() else 1
    if "WIDE" in mods or (base == "CS2R" and "32" not in mods):  # IMAD.WIDE, CS2R R20, SRZ: register pairs
        return 2
    return max(1, access_bits(ins) // 32) if base in GLOBAL_LOADS | SHARED_LOADS | {"LDC", "ULDC"} else 1


def _defs_uses(ins: Instruction) -> tuple[list[str], list[tuple[str, str]]]:
    """(registers written, [(register read, where)]) with where in {"addr", "guard", "value"}."""
    uses = []
    if ins.guard:
        uses += [(r, "guard") for r in _regs(ins.guard)]
    ops = list(ins.operands)
    defs: list[str] = []
    if ins.base not in NO_DEST and ops:
        while ops and ops[0].strip() in ("PT", "UPT"):
            ops = ops[1:]  # a discarded predicate result (SHFL.BFLY PT, R5, ...)
        first = _regs(ops[0].split("[")[0]) if ops else []
        if first:
            head = first[0]
            found = re.fullmatch(r"(U?R)(\d+)", head)
            defs = [f"{found[1]}{int(found[2]) + i}" for i in range(_dest_width(ins))] if found else [head]
            ops = ops[1:]
            # Carry-out / second predicate results follow the first destination (LEA R6, P1, ...;
            # ISETP P0, PT, ...; IADD3 R1, P0, P1, ...).
            while ops and re.fullmatch(r"U?P[0-6T]", ops[0].strip()):
                if ops[0].strip()[-1] != "T":
                    defs.append(ops[0].strip())
                ops = ops[1:]
    for op in ops:
        for inner in re.findall(r"\[([^\]]*)\]", op):
            uses += [(r, "addr") for r in _regs(inner) if not (op.startswith("desc") and inner.startswith("UR"))]
        outside = re.sub(r"\[[^\]]*\]", "", op)
        uses += [(r, "value") for r in _regs(outside)]
    if ins.base in MMA:  # A and B fragments span several registers
        expanded = []
        for r, where in uses:
            expanded.append((r, where))
            if r.startswith("R") and where == "value":
                expanded += [(f"R{int(r[1:]) + i}", where) for i in range(1, 4)]
        uses = expanded
    return defs, uses


def _sources(body: list[Instruction]) -> list[str]:
    """Label each instruction of one loop iteration by what it is for.

    Sinks: register operands inside ``[...]`` of memory instructions are addresses; guard
    predicates of memory (and other non-branch) instructions are masks; operands of math, MMA,
    conversions and stored values are data; the guard of the back edge is loop control. A walk
    backwards over reaching definitions (within the iteration, wrapping around the back edge for
    loop-carried values; predicated definitions do not kill) propagates these to the integer
    instructions that compute them. An integer instruction that feeds data is *decode* when a
    weight-word load is among its ancestors and *convert* (x or table handling) otherwise;
    one that feeds only addresses is *address*, only masks *mask*, only the loop test *loop
    control*. Loads are *weight words* (32-bit or wider, read by bit operations), *index* (their
    value becomes an address: the perm gather), *x / tables / scales* (the rest).
    """
    n = len(body)
    info = [_defs_uses(ins) for ins in body]
    defs_of: dict[str, list[int]] = {}
    for j, (defs, _) in enumerate(info):
        for reg in defs:
            defs_of.setdefault(reg, []).append(j)

    def reaching(i: int, reg: str) -> list[int]:
        """Definitions of ``reg`` that reach instruction i: back to the first unpredicated one,
        wrapping around the back edge (loop-carried); none means defined before the loop."""
        where = defs_of.get(reg, [])
        k = bisect.bisect_left(where, i)
        found = []
        for j in where[:k][::-1] + where[k:][::-1]:
            found.append(j)
            if body[j].guard is None:
                break
        return found

    producers = [[(reaching(i, r), r, where) for r, where in uses] for i, (_, uses) in enumerate(info)]
    roles: list[set[str]] = [set() for _ in body]
    consumers: list[list[int]] = [[] for _ in body]
    for i, ins in enumerate(body):
        is_mem = ins.base in GLOBAL_LOADS | SHARED_LOADS | ASYNC_COPIES | STORES
        for defs, reg, where in producers[i]:
            for j in defs:
                consumers[j].append(i)
            if where == "addr":
                role = "address"
            elif where == "guard":
                role = "control" if ins.base in BRANCHES else "mask"
            elif is_mem or ins.base in MATH | MMA | CONVERSIONS:
                role = "data"
            else:
                continue  # an integer instruction: its inputs inherit its roles below
            for j in defs:
                roles[j].add(role)
    # Propagate roles backwards through integer instructions until nothing changes. A masked
    # load's default value (PRMT R8, RZ, 0x7610, R8 before @!P LDG.U16 R8) reads its register only
    # formally (the half it keeps is never used): it passes nothing on.
    defaults = {i for i in range(n) if _masked_load_default(body, i, info)}
    changed = True
    while changed:
        changed = False
        for i in range(n - 1, -1, -1):
            ins = body[i]
            if i in defaults or ins.base in MATH | MMA | CONVERSIONS | GLOBAL_LOADS | SHARED_LOADS | STORES | ASYNC_COPIES:
                continue
            for defs, _, where in producers[i]:
                inherited = roles[i] if where != "guard" else {"mask"}
                for j in defs:
                    if not inherited <= roles[j]:
                        roles[j] |= inherited
                        changed = True

    def load_kind(i: int) -> str:
        ins = body[i]
        if ins.base in ASYNC_COPIES:
            return "load: async copy to shared"
        readers = {body[c].base for c in consumers[i]}
        # Words first: predicated code can make a word load look address-bound too (ptxas moves
        # values through uniform registers under complementary predicates), and an index load's
        # only bit operation is the sign extension of an address (SHF.R.S32.HI ..., 0x1f).
        if access_bits(ins) >= 32 and readers & BIT_OPS and "data" in roles[i]:
            return "load: weight words"
        if "address" in roles[i]:
            return "load: index (gather)"
        if readers & MMA:
            return "load: MMA operands"
        return "load: x / tables / scales"

    kinds = [load_kind(i) if body[i].base in GLOBAL_LOADS | SHARED_LOADS | ASYNC_COPIES else None for i in range(n)]
    # Taint: does a weight-word load feed this instruction?
    from_words = [kinds[i] == "load: weight words" for i in range(n)]
    changed = True
    while changed:
        changed = False
        for i in range(n):
            if from_words[i]:
                continue
            if any(from_words[j] for defs, _, where in producers[i] if where == "value" for j in defs):
                from_words[i] = changed = True

    labels = []
    for i, ins in enumerate(body):
        base = ins.base
        if kinds[i]:
            label = kinds[i]
        elif base in MMA:
            label = "MMA"
        elif base in CONVERSIONS or (base == "HADD2" and "F32" in ins.modifiers):
            label = "convert"
        elif base in MATH:
            label = "math (FMA/FADD/FMUL)"
        elif base in STORES:
            label = "store: shared (layout)" if base in ("STS", "STSM") else "store: global"
        elif base in SYNCS:
            label = "sync"
        elif base in ("SHFL", "VOTE", "MATCH", "REDUX"):
            label = "cross-thread (SHFL)"
        elif base in CONTROL:
            label = "loop control"
        elif i in defaults:
            label = "mask"
        elif "data" in roles[i]:
            label = "decode" if from_words[i] else "convert"
        elif "address" in roles[i]:
            label = "address"
        elif "mask" in roles[i]:
            label = "mask"
        elif "control" in roles[i]:
            label = "loop control"
        else:
            label = "other"
        labels.append(label)
    return labels


def _masked_load_default(body, i, info) -> bool:
    """A constant written to a register that a predicated load then (maybe) overwrites: the
    ``other=0`` of a masked load."""
    defs, uses = info[i]
    if not defs or any(r not in defs for r, _ in uses):
        return False
    for j in range(i + 1, len(body)):
        if set(defs) & set(info[j][0]):
            return body[j].guard is not None and body[j].base in GLOBAL_LOADS | SHARED_LOADS
    return False


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


@dataclass
class LoopCount:
    """Instructions of one iteration of a kernel's hot loop, per weight.

    ``instructions``: per thread and iteration (inner loops multiplied by their trip counts);
    ``per_weight`` = instructions / weights_per_iteration; ``opcodes``, ``classes`` and
    ``sources`` are per weight and each sums to ``per_weight``. ``loop`` is the (start, end)
    address range, None for a whole-kernel count; ``nested`` lists inner loops as
    (start, end, trips); ``forward_branches`` counts branches that jump forward to an address
    inside the loop (the instructions they skip are counted as executed; loop exits are not
    counted here).
    """

    kernel: str
    arch: int
    loop: tuple[int, int] | None
    weights_per_iteration: float
    instructions: float
    per_weight: float
    opcodes: dict[str, float]
    classes: dict[str, float]
    sources: dict[str, float]
    nested: list[tuple[int, int, int]]
    forward_branches: int
    warnings: list[str]
    top_loops: list[tuple[int, int, int, int]] = field(default_factory=list)  # (start, end, size, decode score)
    load_bytes: dict[str, float] = field(default_factory=dict)  # bytes per weight loaded, by source

    def to_dict(self) -> dict:
        return asdict(self)

    def load_bytes_per_weight(self, kinds=("LDG", "LDGSTS")) -> float:
        """Bytes loaded per weight by the given load opcodes (per thread), e.g. to check that the
        weight words are read once: 2 bits per weight -> 0.25 B + x and metadata."""
        total = 0.0
        for opcode, count in self.opcodes.items():
            ins = Instruction(0, None, opcode, ())
            if ins.base in kinds:
                total += count * access_bits(ins) / 8
        return total


def _weighted(instructions, loop: Loop, trips: dict[int, int], depth: int, nested: list):
    """[(instruction, times per hot-loop iteration)] for a loop and the loops inside it."""
    inner = {ins.address for child in loop.children for ins in _in_range(instructions, child.start, child.end)}
    out = [(ins, 1) for ins in _in_range(instructions, loop.start, loop.end) if ins.address not in inner]
    for child in loop.children:
        if depth + 1 not in trips:
            raise ValueError(
                f"the hot loop [{loop.start:#x}, {loop.end:#x}] contains a loop at depth {depth + 1} "
                f"[{child.start:#x}, {child.end:#x}]: pass inner_trips={{{depth + 1}: trips}}"
            )
        nested.append((child.start, child.end, trips[depth + 1]))
        out += [(ins, k * trips[depth + 1]) for ins, k in _weighted(instructions, child, trips, depth + 1, nested)]
    return out


def _size(instructions, loop: Loop) -> int:
    return len(_in_range(instructions, loop.start, loop.end))


def _decode_score(instructions, loop: Loop) -> int:
    """How much a loop looks like a weight-decoding loop: its bit-field, int-to-float and MMA
    instructions (a CSR or epilogue loop has few; a larger one of them must not win)."""
    return sum(1 for ins in _in_range(instructions, loop.start, loop.end)
               if ins.base in BIT_OPS | MMA | {"I2F", "I2FP", "SEL", "FSEL"})


def count_instructions(instructions: list[Instruction], kernel: str, arch: int, weights_per_iteration: float, *,
                       inner_trips: dict[int, int] | None = None, loop: str | int = "auto") -> LoopCount:
    """:func:`count_hot_loop` on already parsed instructions (see there)."""
    if weights_per_iteration <= 0:
        raise ValueError("weights_per_iteration must be positive")
    warnings = []
    roots = find_loops(instructions)
    if loop == "kernel":
        chosen = None
        weighted = [(ins, 1) for ins in instructions if ins.base != "NOP" and not _is_trap(ins)]
        nested = []
        if roots:
            warnings.append(f"loop='kernel' counts {len(roots)} loop(s) once each")
    else:
        if not roots:
            raise LookupError(f"{kernel} (sm_{arch}) has no loop; use loop='kernel' for straight-line kernels")
        if loop == "auto":
            chosen = max(roots, key=lambda lp: (_decode_score(instructions, lp), _size(instructions, lp)))
        else:
            def walk(lps):
                for lp in lps:
                    yield lp
                    yield from walk(lp.children)

            matches = [lp for lp in walk(roots) if lp.start == loop]
            if not matches:
                raise LookupError(f"no loop starts at {loop:#x} in {kernel}: {[(hex(lp.start), hex(lp.end)) for lp in walk(roots)]}")
            chosen = matches[0]
        nested = []
        weighted = _weighted(instructions, chosen, inner_trips or {}, 0, nested)
    body = [ins for ins, _ in weighted]
    labels = _sources(sorted(body, key=lambda ins: ins.address))
    by_address = dict(zip(sorted(ins.address for ins in body), labels))
    opcodes, classes, sources, load_bytes = Counter(), Counter(), Counter(), Counter()
    for ins, times in weighted:
        opcodes[ins.opcode] += times
        classes[instruction_class(ins)] += times
        sources[by_address[ins.address]] += times
        if ins.base in GLOBAL_LOADS | SHARED_LOADS | ASYNC_COPIES and ins.base != "LDSM":
            load_bytes[by_address[ins.address]] += times * access_bits(ins) / 8
    total = float(sum(times for _, times in weighted))
    # Forward branches that land inside the loop skip some of its instructions; exits do not (a
    # jump to just after the back edge of an inner loop, e.g. ptxas's CALL.REL.NOINC idiom).
    end = chosen.end if chosen is not None else max(ins.address for ins in body)
    exits = {e + 16 for _, e, _ in nested}
    forward = sum(1 for ins in body if ins.branch_target() is not None
                  and ins.address < ins.branch_target() <= end and ins.branch_target() not in exits)
    if any(ins.base == "CALL" and "NOINC" not in ins.modifiers for ins in body):
        warnings.append("the loop calls a subroutine whose instructions are not counted")
    if classes.get("LDL (spill)") or classes.get("STL (spill)"):
        warnings.append("local-memory (spill) traffic inside the loop")
    w = float(weights_per_iteration)
    return LoopCount(
        kernel=kernel, arch=arch, loop=None if chosen is None else (chosen.start, chosen.end),
        weights_per_iteration=w, instructions=total, per_weight=total / w,
        opcodes={k: v / w for k, v in sorted(opcodes.items())},
        classes={k: v / w for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        sources={k: v / w for k, v in sorted(sources.items(), key=lambda kv: -kv[1])},
        nested=nested, forward_branches=forward, warnings=warnings,
        top_loops=[(lp.start, lp.end, _size(instructions, lp), _decode_score(instructions, lp)) for lp in roots],
        load_bytes={k: v / w for k, v in sorted(load_bytes.items())},
    )


def _is_trap(ins: Instruction) -> bool:
    return ins.branch_target() == ins.address


def count_hot_loop(binary, kernel: str, weights_per_iteration: float, *, arch: int | None = None,
                   inner_trips: dict[int, int] | None = None, loop: str | int = "auto") -> LoopCount:
    """Count the hot loop of ``kernel`` in a compiled binary, per weight.

    binary      cubin bytes, a path to anything ``cuobjdump`` reads, or an already disassembled
                ``cuobjdump -sass`` listing (a str that contains "Function :")
    kernel      the function's name (exact, else a unique substring: mangled C++ names work)
    weights_per_iteration   weights ONE THREAD decodes per iteration of the hot loop
    arch        sm version to pick when the binary holds several (e.g. 90 for sm_90a)
    inner_trips {depth: trip count} of loops nested in the hot loop (depth 1 = directly inside);
                required when SASS shows such loops, ignored for depths that do not occur
    loop        "auto" (the outermost loop with the most bit-field, int-to-float, select and MMA
                instructions, then the most instructions), "kernel" (the whole
                function, for kernels without a loop), or the start address of a loop
    """
    if isinstance(binary, str) and "Function :" in binary:
        text = binary
    else:
        text = disassemble(binary)
    found_arch, instructions = select_function(parse_sass(text), kernel, arch)
    return count_instructions(instructions, kernel, found_arch, weights_per_iteration, inner_trips=inner_trips,
                              loop=loop)


# --------------------------------------------------------------------------------------------
# Throughput model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """Per-SM, per-clock rates of one architecture, in thread-instructions (one warp
    instruction = 32). ``tensor_macs`` is dense fp16/bf16 multiply-adds per clock per SM with
    fp32 accumulation. Sources and what is unverified: docs/kernels.md section 5."""

    sm: int
    issue: int  # 4 schedulers x 1 warp instruction per clock
    fma: int  # FFMA/FMUL/FADD and IMAD together
    fmaheavy: int  # IMAD alone (the half of the FMA pipe that does integer multiply-add)
    alu: int  # logic, shifts, PRMT, LEA, IADD3, compares, selects, moves, I2FP
    fp16: int  # HFMA2/HADD2/HMUL2 instructions (two results each); HADD2.F32 assumed here too
    xu: int  # I2F/F2F/F2I/I2I, MUFU: "all other type conversions" rate
    lsu: int  # loads, stores, LDGSTS, LDSM, SHFL: one warp instruction per clock per SM (assumed)
    tensor_macs: int
    unverified: tuple[str, ...] = ()


ARCHS = {
    80: Arch(80, issue=128, fma=64, fmaheavy=64, alu=64, fp16=128, xu=16, lsu=32, tensor_macs=1024,
             unverified=("lsu", "fp16 pipe for HADD2.F32")),
    86: Arch(86, issue=128, fma=128, fmaheavy=64, alu=64, fp16=64, xu=16, lsu=32, tensor_macs=256,
             unverified=("lsu", "fp16 pipe for HADD2.F32", "fmaheavy")),
    89: Arch(89, issue=128, fma=128, fmaheavy=64, alu=64, fp16=64, xu=16, lsu=32, tensor_macs=256,
             unverified=("lsu", "fp16 pipe for HADD2.F32", "fmaheavy")),
    90: Arch(90, issue=128, fma=128, fmaheavy=64, alu=64, fp16=128, xu=16, lsu=32, tensor_macs=2048,
             unverified=("lsu", "fp16 pipe for HADD2.F32", "fmaheavy", "I2FP on the ALU at 64",
                         "tensor_macs is wgmma's rate; mma.sync (HMMA) reaches less")),
}


@dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    sms: int
    clock_ghz: float  # boost clock the vendor's peak FLOP/s figures use
    bandwidth_tbs: float  # DRAM bandwidth, TB/s
    source: str


GPUS = {
    "H100 SXM": Gpu("H100 SXM", 90, 132, 1.98, 3.35, "NVIDIA H100 datasheet: 3.35 TB/s; 132 SMs; 66.9 FP32 TFLOP/s = 132 x 128 x 2 x 1.98 GHz"),
    "H200": Gpu("H200", 90, 132, 1.98, 4.8, "NVIDIA H200 datasheet 4.8 TB/s; 132 SMs and 1980 MHz read on this project's H200 (device KINDS.md)"),
    "H200 (copy 4.3 TB/s)": Gpu("H200 (copy 4.3 TB/s)", 90, 132, 1.98, 4.3, "device-to-device copy measured on this project's H200 (device KINDS.md, 2026-10-28 and 11-04)"),
    "A100 SXM 80GB": Gpu("A100 SXM 80GB", 80, 108, 1.41, 2.039, "NVIDIA A100 datasheet: 2039 GB/s; 108 SMs; 19.5 FP32 TFLOP/s = 108 x 64 x 2 x 1.41 GHz"),
    "RTX 4090": Gpu("RTX 4090", 89, 128, 2.52, 1.008, "NVIDIA RTX 4090 specs: 1008 GB/s, 128 SMs, 2520 MHz boost, 82.6 FP32 TFLOP/s"),
}

_FP32 = {"FFMA", "FFMA32I", "FMUL", "FMUL32I", "FADD", "FADD32I"}
_IMAD = {"IMAD", "IMUL", "XMAD"}
_ALU = {"LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "PRMT", "SGXT", "BFE", "BFI", "BMSK", "LEA", "ISCADD", "IADD3",
        "IADD", "VIADD", "ISETP", "FSETP", "PSETP", "PLOP3", "SEL", "FSEL", "MOV", "MOV32I", "IMNMX", "VIMNMX",
        "VIADDMNMX", "FMNMX", "I2FP", "F2FP", "P2R", "R2P", "IABS", "HSETP2", "CS2R"}
_FP16 = {"HFMA2", "HMUL2", "HADD2", "HMNMX2"}
_XU = {"I2F", "F2F", "F2I", "I2I", "MUFU", "FRND", "FLO", "POPC", "BREV", "F2IP", "I2IP"}
_LSU = GLOBAL_LOADS | SHARED_LOADS | ASYNC_COPIES | STORES | LOCAL | {"SHFL", "ATOM", "ATOMS", "ATOMG", "MATCH", "REDUX"}
_PIPES = [("fp32", _FP32), ("imad", _IMAD), ("fp16", _FP16), ("xu", _XU), ("alu", _ALU), ("lsu", _LSU)]


def mma_macs(opcode: str) -> int:
    """Multiply-adds one warp's MMA instruction performs (HMMA.16816: 16*8*16; HGMMA.64xNx16 is
    issued by each of the 4 warps of a warpgroup: a quarter of 64*N*16 each)."""
    ins = Instruction(0, None, opcode, ())
    if ins.base == "HMMA":
        shape = ins.modifiers[0] if ins.modifiers else ""
        dims = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}.get(shape, (16, 8, 16))
        return dims[0] * dims[1] * dims[2]
    found = re.match(r"(\d+)x(\d+)x(\d+)", ins.modifiers[0]) if ins.modifiers else None
    return int(found[1]) * int(found[2]) * int(found[3]) // 4 if found else 0


def pipe_cycles(count: LoopCount, arch: Arch) -> dict[str, float]:
    """Clock cycles per weight per SM each pipe needs, and ``issue`` for the schedulers.

    Per-weight counts are per thread, so a pipe of rate r thread-instructions per clock per SM
    needs count / r cycles per weight. MMA instructions are costed by their multiply-adds.
    """
    by_pipe = Counter()
    macs = 0.0
    for opcode, n in count.opcodes.items():
        base = opcode.split(".")[0]
        if base in MMA:
            macs += n / 32 * mma_macs(opcode)
            continue
        pipe = next((name for name, members in _PIPES if base in members), None)
        if pipe:
            by_pipe[pipe] += n
    cycles = {
        "issue": count.per_weight / arch.issue,
        "fma": (by_pipe["fp32"] + by_pipe["imad"]) / arch.fma,
        "fmaheavy": by_pipe["imad"] / arch.fmaheavy,
        "alu": by_pipe["alu"] / arch.alu,
        "fp16": by_pipe["fp16"] / arch.fp16,
        "xu": by_pipe["xu"] / arch.xu,
        "lsu": by_pipe["lsu"] / arch.lsu,
        "tensor": macs / arch.tensor_macs,
    }
    return cycles


def predict(count: LoopCount, gpu: Gpu, bytes_per_weight: float) -> dict:
    """What the count predicts on ``gpu`` for a kernel that moves ``bytes_per_weight`` of DRAM
    traffic per weight (codes and metadata; plus the dense write for a dequantize kernel).

    Returns the issue budget (instructions per weight the schedulers can issue while DRAM streams
    at full bandwidth), the cycles per weight per SM of the issue limit and of the busiest pipe,
    and ``roofline`` = memory time / max(memory time, instruction time): the predicted fraction
    of bandwidth if issue and pipes were the only limits and overlapped perfectly.
    """
    arch = ARCHS[gpu.arch]
    cycles = pipe_cycles(count, arch)
    rate = gpu.sms * gpu.clock_ghz * 1e9  # SM-cycles per second
    t_mem = bytes_per_weight / (gpu.bandwidth_tbs * 1e12)
    binding = max(cycles, key=cycles.get)
    t_compute = cycles[binding] / rate
    budget = arch.issue * rate * t_mem
    pipe = max((k for k in cycles if k != "issue"), key=cycles.get)
    return dict(
        gpu=gpu.name, budget_instructions_per_weight=budget, issue_cycles=cycles["issue"],
        pipe=pipe, pipe_cycles=cycles[pipe], bound_by=binding, roofline=min(1.0, t_mem / t_compute) if t_compute else 1.0,
        cycles=cycles,
    )

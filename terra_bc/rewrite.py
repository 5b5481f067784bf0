"""Stage 2 of the pipeline: rewrite the call sites of one code object.

Every call ``f(a, b)`` becomes ``site(f, a, b)``, where ``site`` is a ``Site`` constant
(a C object, see ``_hook.c``) that counts the call and forwards it with no Python frame
of its own.  The trick that keeps the rewrite local and the stack depth unchanged: CPython
3.11-3.13 push a pair before the arguments of a call, ``[NULL, callable]`` (3.11/3.12),
``[callable, NULL]`` (3.13) or a method pair ``[method, self]``.  We find the instruction
that pushes that pair and make it push ``[site, callable]`` instead; ``CALL`` then calls
``site(callable, *args)``.  A call with ``*``/``**`` (``CALL_FUNCTION_EX``) gets an
"unpacking" site and becomes the plain call ``site(callable, args[, kwargs])``.

The result is checked against the original (exception table, positions, locals layout,
stack size) and refused on any difference: a refused code object runs unmodified.
"""
from __future__ import annotations

import dis
import inspect
import sys
import types
from dataclasses import dataclass

from bytecode import Bytecode, Instr, Label, TryBegin, TryEnd
from bytecode.concrete import _ConvertBytecodeToConcrete

from ._hook import LoopExit, LoopHead, LoopMark, Site

PY313 = sys.version_info >= (3, 13)
PY311 = sys.version_info < (3, 12)
EXTENDED_ARG = dis.opmap["EXTENDED_ARG"]
# Consumers of a call pair; 3.11 reads its layout at PRECALL (CALL then only pops the pair).
CALL_OPS = {"PRECALL"} if PY311 else {"CALL", "CALL_KW"}
CALL_OPCODES = {dis.opmap[name] for name in ("CALL", "CALL_KW", "PRECALL", "CALL_FUNCTION_EX")
                if name in dis.opmap}
GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE
# Generators (``sum(jnp.sum(g * g) for g in grads)``) are rewritten: the hook swaps their code
# at the call that creates them, before RETURN_GENERATOR copies the frame into the generator,
# and never touches a resumed frame (owned by the generator).  Coroutines stay as they are.
UNTOUCHED_FLAGS = GENERATOR_FLAGS & ~inspect.CO_GENERATOR


class Unsupported(Exception):
    """This code object cannot be rewritten faithfully; it must run unmodified."""


@dataclass(frozen=True)
class Rewritten:
    code: types.CodeType
    sites: tuple  # the Site objects, in bytecode order


def rewrite(code: types.CodeType, loops: bool = True) -> Rewritten | None:
    """Return the rewritten code, or None when ``code`` has no call site to rewrite.
    ``loops``: give its ``for`` loops loop marks (user code; a library's loops are part of
    the user's iteration that runs them).

    Raises Unsupported when the code cannot be rewritten faithfully.
    """
    if code.co_flags & UNTOUCHED_FLAGS:
        raise Unsupported("coroutine frames are resumed by event loops: their code stays as is")
    if not CALL_OPCODES.intersection(code.co_code[::2]):
        return None  # no call at all: decided without disassembling (cheap, allocates nothing)
    try:
        bc = Bytecode.from_code(code)
    except Exception as e:  # the bytecode package cannot read a few rare code objects
        raise Unsupported(f"bytecode cannot disassemble it: {e!r}") from e
    offsets = _instr_offsets(code, bc)
    _restore_handler_depths(code, bc, offsets)
    pairs, stacks = _pair_calls(bc)
    # A generator's loop turn would stay open while it is suspended: no loop units there.
    marked = loops and not code.co_flags & GENERATOR_FLAGS
    marks = _for_loops(bc, stacks, code.co_stacksize) if marked else []
    whiles = _while_loops(code, bc, stacks, offsets) if marked else []
    if not pairs and not marks and not whiles:
        return None
    try:
        return _build(code, bc, pairs, marks, whiles, offsets)
    except Unsupported:
        if not whiles:
            raise
        # The calls are what matter most: without while-loop marks rather than not at all.
        return _build(code, bc, pairs, marks, [], offsets) if pairs or marks else None


def _build(code, bc, pairs, marks, whiles, offsets):
    new_bc, expansion, borrowed, sites = _apply(code, bc, pairs, marks, whiles, offsets)
    new_code = _assemble(code, new_bc)
    _verify(code, new_code, expansion, borrowed)
    return Rewritten(new_code, tuple(sites))


# ---------------------------------------------------------------- analysis

def _instr_offsets(code, bc):
    """Byte offset of each abstract Instr of ``bc`` in ``code`` (aligned by opname)."""
    real = _real_instructions(code)
    instrs = [i for i in bc if isinstance(i, Instr)]
    if [name for _, name in real] != [i.name for i in instrs]:
        raise Unsupported("bytecode's instruction list does not align with the code")
    return {id(ins): offset for ins, (offset, _) in zip(instrs, real)}


def _restore_handler_depths(code, bc, offsets):
    """Set each TryBegin's stack depth from the original exception table.

    ``Bytecode.from_code`` leaves them unset, and recomputing them is not faithful for some
    handlers (see DESIGN.md); our rewrite never changes a depth, so the original ones hold.
    """
    depth_at = {e.target: (e.depth, e.lasti) for e in dis._parse_exception_table(code)}
    items = list(bc)
    label_at = {id(x): n for n, x in enumerate(items) if isinstance(x, Label)}
    for item in items:
        if isinstance(item, TryBegin):
            label = label_at[id(item.target)]
            target = next(i for i in items[label:] if isinstance(i, Instr))
            depth, lasti = depth_at[offsets[id(target)]]
            if bool(lasti) != bool(item.push_lasti):
                raise Unsupported("handler lasti flag disagrees with the exception table")
            item.stack_depth = depth


def _null_slot_pushed(instr):
    """How far below the top ``instr`` leaves a call pair's NULL/method slot (None: not a producer)."""
    name, arg = instr.name, instr.arg
    if name == "PUSH_NULL":
        return 1
    if name == "LOAD_METHOD":
        return 2
    if name in ("LOAD_GLOBAL", "LOAD_ATTR", "LOAD_SUPER_ATTR") and isinstance(arg, tuple) and arg[0]:
        return 1 if PY313 else 2
    return None


def _null_slot_depth(instr):
    """How far below the top a call consumer finds its NULL/method slot (None: not a consumer)."""
    name, arg = instr.name, instr.arg
    if name in CALL_OPS:
        return arg + (2 if name == "CALL_KW" else 1) + (0 if PY313 else 1)
    if name == "CALL_FUNCTION_EX":
        return (2 if PY313 else 3) + (arg & 1)
    return None


def _pair_calls(bc):
    """Map each call consumer to the instruction that pushed its NULL/method slot.

    An abstract interpretation over the linear instruction list: the state is the stack
    with each slot tagged by the instruction that pushed a call pair's NULL/method slot
    (or None).  Consumers whose slot is not a single, well-known producer are left alone.
    """
    items = list(bc)
    label_at = {id(x): n for n, x in enumerate(items) if isinstance(x, Label)}
    states = {0: ()}
    work = [0]
    seen = {}   # consumer index -> producer Instr (None: ambiguous)
    bad = set()

    def flow(n, stack):
        old = states.get(n)
        if old is None:
            states[n] = stack
            work.append(n)
        elif old != stack:
            if len(old) != len(stack):
                raise Unsupported("stack depth differs between paths")
            merged = tuple(a if a is b else None for a, b in zip(old, stack))
            bad.update(id(t) for a, b in zip(old, stack) if a is not b for t in (a, b) if t)
            if merged != old:
                states[n] = merged
                work.append(n)

    while work:
        n = work.pop()
        stack = list(states[n])
        item = items[n]
        if isinstance(item, TryBegin):
            handler = stack[: item.stack_depth] + [None] * (1 + item.push_lasti)
            flow(label_at[id(item.target)], tuple(handler))
        if not isinstance(item, Instr):
            if n + 1 < len(items):
                flow(n + 1, tuple(stack))
            continue
        depth = _null_slot_depth(item)
        if depth is not None:
            producer = stack[-depth] if depth <= len(stack) else None
            if n in seen and seen[n] is not producer:
                producer = None
            seen[n] = producer
        if item.has_jump():
            flow(label_at[id(item.arg)], tuple(_step(item, stack, jump=True)))
        if not (item.is_uncond_jump() or item.is_final()) and n + 1 < len(items):
            flow(n + 1, tuple(_step(item, stack, jump=False)))

    consumers = {}  # producer id -> consumer indices
    for n, producer in seen.items():
        if producer is None or id(producer) in bad:
            continue
        if items[n].name == "CALL_FUNCTION_EX" and producer.name not in ("PUSH_NULL", "LOAD_GLOBAL"):
            continue
        consumers.setdefault(id(producer), (producer, []))[1].append(n)
    # A producer may feed several plain calls: 3.12+ copies a call into both arms of a
    # conditional argument (`jnp.array(a if c else jnp.sqrt(a))`).  Its one replacement
    # then serves each of them (the site is keyed by the first); an unpacking call, whose
    # own instruction changes too, is left alone there.
    return {sorted(ns)[0]: producer for producer, ns in consumers.values()
            if len(ns) == 1 or all(items[n].name != "CALL_FUNCTION_EX" for n in ns)}, states


def _for_loops(bc, stacks, stacksize):
    """Indices of the GET_ITER of each `for` statement (GET_ITER then, past labels, FOR_ITER)
    with room on the stack for the LoopMark call (one more value)."""
    items = list(bc)
    loops = []
    for n, item in enumerate(items):
        if not (isinstance(item, Instr) and item.name == "GET_ITER") or n not in stacks:
            continue
        following = next((i for i in items[n + 1:] if isinstance(i, Instr)), None)
        if following is not None and following.name == "FOR_ITER" and len(stacks[n]) + 1 <= stacksize:
            loops.append(n)
    return loops


@dataclass(frozen=True)
class WhileLoop:
    head: int     # index in the bytecode of the instruction each turn begins at
    exits: tuple  # (index, raised) of each instruction control reaches on leaving the loop
    entry: int    # index of an instruction of the statement that leads into the loop (its
    #               first condition check), or of a back edge's source: see _while_marks


def _while_loops(code, bc, stacks, offsets):
    """The loops that are not ``for`` loops, as natural loops of the control-flow graph
    (exception edges included): the head of each back edge whose target dominates its
    source, the loop body, and where control goes on leaving the body.  A loop is left
    out where the stack has no room for a mark's call (two more values) at its head or at
    one of its exits."""
    items = list(bc)
    succ, back = _control_flow(code, items, offsets)
    if not back:
        return []
    preds = {n: [] for n in succ}
    for n, edges in succ.items():
        for m, _ in edges:
            preds[m].append(n)
    dominators = _dominators(succ, preds, entry=min(succ))
    heads, sources = {}, {}
    for n, h in back:
        if n in dominators and _dominates(dominators, h, n) and items[h].name != "FOR_ITER":
            heads.setdefault(h, set()).update(_natural_loop(preds, n, h))
            sources.setdefault(h, n)
    for h, body in heads.items():  # (the way in from outside the body, where there is one)
        sources[h] = min((n for n in preds[h] if n not in body), default=sources[h])
    room = lambda k: k in stacks and len(stacks[k]) + 2 <= code.co_stacksize  # noqa: E731
    loops = []
    for h, body in sorted(heads.items()):
        exits = sorted({(m, raised) for n in body for m, raised in succ[n] if m not in body})
        if room(h) and all(room(m) for m, _ in exits):
            loops.append(WhileLoop(h, tuple(exits), sources[h]))
    return loops


def _control_flow(code, items, offsets):
    """Successors of each instruction (index -> [(index, by an exception)]) and the
    backward jumps (source, target) that may close loops."""
    at_offset = {offsets[id(x)]: n for n, x in enumerate(items) if isinstance(x, Instr)}
    order = sorted(at_offset.values())
    following = dict(zip(order, order[1:]))
    label_at = {id(x): n for n, x in enumerate(items) if isinstance(x, Label)}
    first_instr = lambda k: next(j for j in range(k, len(items)) if isinstance(items[j], Instr))  # noqa: E731
    handler = {}
    for e in dis._parse_exception_table(code):
        for off in range(e.start, e.end, 2):
            if off in at_offset:
                handler[at_offset[off]] = at_offset[e.target]
    succ, back = {}, []
    for n in order:
        instr = items[n]
        edges = []
        if instr.has_jump():
            target = first_instr(label_at[id(instr.arg)])
            edges.append((target, False))
            if target <= n and "BACKWARD" in instr.name and "NO_INTERRUPT" not in instr.name:
                back.append((n, target))
        if not (instr.is_uncond_jump() or instr.is_final()) and n in following:
            edges.append((following[n], False))
        if n in handler:
            edges.append((handler[n], True))
        succ[n] = edges
    return succ, back


def _dominators(succ, preds, entry):
    """Each reachable node's immediate dominator (the entry's is itself), by Cooper, Harvey
    and Kennedy's iterative algorithm over reverse postorder (unreachable predecessors,
    which never get one, are skipped)."""
    order, seen, stack = [], {entry}, [(entry, iter(succ[entry]))]
    while stack:  # postorder, without recursion
        node, edges = stack[-1]
        nxt = next((m for m, _ in edges if m not in seen), None)
        if nxt is None:
            order.append(node)
            stack.pop()
            continue
        seen.add(nxt)
        stack.append((nxt, iter(succ[nxt])))
    rank = {n: k for k, n in enumerate(order)}  # postorder number: the entry's is highest
    idom = {entry: entry}

    def meet(a, b):
        while a != b:
            while rank[a] < rank[b]:
                a = idom[a]
            while rank[b] < rank[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for n in reversed(order[:-1]):
            done = [p for p in preds[n] if p in idom]
            new = done[0]
            for p in done[1:]:
                new = meet(p, new)
            if idom.get(n) != new:
                idom[n], changed = new, True
    return idom


def _dominates(idom, a, b):
    """Does ``a`` dominate ``b`` (both reachable)?"""
    while b != a:
        if idom[b] == b:
            return False
        b = idom[b]
    return True


def _natural_loop(preds, source, head):
    """The nodes that reach ``source`` without passing ``head``, and ``head``."""
    body, work = {head, source}, [source]
    while work:
        for p in preds[work.pop()]:
            if p not in body:
                body.add(p)
                work.append(p)
    return body


def _step(instr, stack, jump):
    name = instr.name
    if name == "SWAP":
        stack = list(stack)
        stack[-1], stack[-instr.arg] = stack[-instr.arg], stack[-1]
        return stack
    if name == "COPY":
        return list(stack) + [None]
    if name == "RETURN_GENERATOR":  # resumed with the value sent, popped next (dis says 0 on 3.11/3.12)
        return list(stack) + [None]
    stack = list(stack)
    for effect in instr.pre_and_post_stack_effect(jump):  # applied in turn: pops < 0 < pushes
        if -effect > len(stack):
            raise Unsupported(f"stack underflow at {name}")
        stack = stack[: len(stack) + effect] if effect < 0 else stack + [None] * effect
    depth = _null_slot_pushed(instr)
    if depth is not None:
        stack[-depth] = instr
    return stack


# ---------------------------------------------------------------- transformation

def _site_key(code, offset):
    return (code.co_filename, code.co_qualname, code.co_firstlineno, offset)


def _producer_replacement(instr, site, unpacking):
    """Instructions that push ``[site, callable]`` where ``instr`` pushed its call pair.

    On 3.13 an unpacking site is pushed as ``[callable, site]`` and the two are exchanged
    only at the call: DICT_MERGE finds the callable there to name it in its error message.
    """
    loc = instr.location
    load_site = [Instr("LOAD_CONST", site, location=loc)]
    if not (unpacking and PY313):
        load_site.append(Instr("SWAP", 2, location=loc))
    name, arg = instr.name, instr.arg
    if name == "PUSH_NULL":
        # 3.11/3.12 push NULL before the callable, 3.13 after it.
        return load_site if PY313 else load_site[:1]
    if name == "LOAD_METHOD":
        plain = Instr("LOAD_ATTR", arg, location=loc)
    else:
        plain = Instr(name, (False,) + tuple(arg[1:]), location=loc)
    return [plain] + load_site


def _unpacking_call(instr):
    """``CALL_FUNCTION_EX k`` becomes a plain call of the site: ``site(f, args[, kwargs])``."""
    n = 1 + (instr.arg & 1)
    loc = instr.location
    exchange = []
    if PY313:  # [f, site, args(, kw)] -> [site, f, args(, kw)], three swaps through the top
        exchange = [Instr("SWAP", n + 2, location=loc), Instr("SWAP", n + 1, location=loc),
                    Instr("SWAP", n + 2, location=loc)]
    call = [Instr("CALL", n, location=loc)]
    return exchange + ([Instr("PRECALL", n, location=loc)] + call if PY311 else call)


def _loop_mark(instr, mark):
    """``GET_ITER`` of a for statement becomes ``GET_ITER(mark(iterable))``."""
    loc = instr.location
    call = [Instr("PRECALL", 0, location=loc)] if PY311 else []
    return ([Instr("LOAD_CONST", mark, location=loc), Instr("SWAP", 2, location=loc)] + call +
            [Instr("CALL", 0, location=loc), instr])


def _call_no_args(obj, loc):
    """Instructions that call ``obj()`` and drop the result (two more values on the stack)."""
    load = Instr("LOAD_CONST", obj, location=loc)
    null = Instr("PUSH_NULL", location=loc)
    call = ([Instr("PRECALL", 0, location=loc)] if PY311 else []) + [Instr("CALL", 0, location=loc)]
    return ([load, null] if PY313 else [null, load]) + call + [Instr("POP_TOP", location=loc)]


def _while_marks(code, items, whiles, offsets):
    """Instructions to run before some instructions (index -> list): each while loop's
    LoopHead call where its turns begin, its LoopExit calls where it is left; the loop
    heads whose calls take the exception handler of another instruction (head index ->
    that instruction's index)."""
    before, heads, borrowed = {}, [], {}
    for loop in whiles:
        head = LoopHead(_site_key(code, offsets[id(items[loop.head])]))
        heads.append(head)
        for n, raised in loop.exits:
            before.setdefault(n, []).append(LoopExit(head, raised))
        before.setdefault(loop.head, []).append(head)  # after exits landing there too
    calls = {n: [i for obj in objs for i in _call_no_args(obj, items[n].location)]
             for n, objs in before.items()}
    handlers = _handlers_at(items)
    for loop in whiles:
        # A turn's head is often the NOP of a `try:` that begins the body, which CPython
        # leaves out of the exception table (a NOP cannot raise): the head's call, which
        # raises the program's error or an interrupt where the loop turns, would have no
        # handler and skip a `try` around the loop.  It gets the handler of the code that
        # leads into the loop (its first condition check), the `while` statement's own.
        entry = handlers[loop.entry]
        if handlers[loop.head] is None and entry is not None:
            begin = entry.copy()
            calls[loop.head] = [begin] + calls[loop.head] + [TryEnd(begin)]
            borrowed[loop.head] = loop.entry
    return calls, heads, borrowed


def _handlers_at(items):
    """The TryBegin in effect at each item (None: no handler)."""
    out, current = [], None
    for item in items:
        if isinstance(item, TryBegin):
            current = item
        elif isinstance(item, TryEnd):
            current = None
        out.append(current)
    return out


def _apply(code, bc, pairs, loops, whiles, offsets):
    items = list(bc)
    replace = {}
    before, sites, borrowed_at = _while_marks(code, items, whiles, offsets)
    for n in loops:
        mark = LoopMark(_site_key(code, offsets[id(items[n])]))
        sites.append(mark)
        replace[id(items[n])] = _loop_mark(items[n], mark)
    for n, producer in sorted(pairs.items()):
        consumer = items[n]
        unpacking = consumer.name == "CALL_FUNCTION_EX"
        site = Site(_site_key(code, offsets[id(consumer)]), unpacking=unpacking)
        sites.append(site)
        replace[id(producer)] = _producer_replacement(producer, site, unpacking)
        if unpacking:
            replace[id(consumer)] = _unpacking_call(consumer)
    new = bc.copy()
    new.clear()
    expansion = []  # for each original Instr, how many Instrs it became
    borrowed = {}   # original Instr -> (how many of its first Instrs, the Instr whose handler)
    instr_index = {id(x): k for k, x in enumerate(x for x in items if isinstance(x, Instr))}
    for n, item in enumerate(items):
        out = before.get(n, []) + replace.get(id(item), [item])
        new.extend(out)
        if isinstance(item, Instr):
            if n in borrowed_at:
                borrowed[len(expansion)] = (sum(isinstance(x, Instr) for x in before[n]),
                                            instr_index[id(items[borrowed_at[n]])])
            expansion.append(sum(isinstance(x, Instr) for x in out))
    return new, expansion, borrowed, sites


def _assemble(code, bc):
    """``bc.to_code()``, but keeping the original order of local names and the stack size.

    bytecode numbers locals by first use; CPython by declaration.  The frame swap needs the
    same locals layout, so we seed the converter with the original names.
    """
    converter = _ConvertBytecodeToConcrete(bc)
    for name in code.co_varnames:
        converter.add_varname(name)
    concrete = converter.to_concrete_bytecode(compute_exception_stack_depths=False)
    made = concrete.to_code(stacksize=code.co_stacksize, compute_exception_stack_depths=False)
    return made.replace(co_linetable=location_table(made.co_firstlineno, made.co_positions()))


# ---------------------------------------------------------------- the location table
#
# bytecode writes a column of 128 or more (a long line, a long docstring) as a one-line
# entry's raw byte, whose top bit marks the start of an entry: CPython's line lookup
# (tracebacks, co_lines, f_lineno) walks entries by that bit and read wrong lines (line -8
# for line 7), while co_positions, which decodes each field, read right.  So the table is
# written again from the positions, as CPython's compiler writes it (Objects/locations.md).

_NO_LOCATION, _LONG, _NO_COLUMNS, _ONE_LINE = 15, 14, 13, 10


def location_table(firstlineno, positions) -> bytes:
    """co_linetable for a code object whose code units have ``positions`` (its
    co_positions(), one (line, end line, column, end column) per code unit)."""
    positions, out, line, k = list(positions), bytearray(), firstlineno, 0
    while k < len(positions):
        pos, run = positions[k], 1
        while k + run < len(positions) and run < 8 and positions[k + run] == pos:
            run += 1
        k += run
        lineno, end_lineno, col, end_col = pos
        if lineno is None:
            out.append(0x80 | _NO_LOCATION << 3 | run - 1)
            continue
        delta, line = lineno - line, lineno
        end_lineno = lineno if end_lineno is None else end_lineno
        if col is None or end_col is None:
            if end_lineno == lineno:
                out.append(0x80 | _NO_COLUMNS << 3 | run - 1)
                out += _svarint(delta)
                continue
            col = end_col = -1
        elif end_lineno == lineno:
            if delta == 0 and col < 80 and 0 <= end_col - col < 16:  # (short form)
                out.append(0x80 | (col >> 3) << 3 | run - 1)
                out.append((col & 7) << 4 | end_col - col)
                continue
            if 0 <= delta < 3 and col < 128 and end_col < 128:
                out.append(0x80 | (_ONE_LINE + delta) << 3 | run - 1)
                out += bytes((col, end_col))
                continue
        out.append(0x80 | _LONG << 3 | run - 1)
        out += _svarint(delta) + _varint(end_lineno - lineno) + _varint(col + 1) + _varint(end_col + 1)
    return bytes(out)


def _varint(v):
    out = bytearray()
    while v >= 64:
        out.append(0x40 | v & 63)
        v >>= 6
    out.append(v)
    return bytes(out)


def _svarint(v):
    return _varint((-v) << 1 | 1 if v < 0 else v << 1)


# ---------------------------------------------------------------- verification

_SAME = ("co_argcount", "co_posonlyargcount", "co_kwonlyargcount", "co_flags", "co_nlocals",
         "co_varnames", "co_cellvars", "co_freevars", "co_name", "co_qualname",
         "co_filename", "co_firstlineno", "co_stacksize")


def _verify(old, new, expansion, borrowed=None):
    """The rewritten code ``new`` is ``old`` with each instruction expanded into
    ``expansion[i]`` instructions of the same source position and exception handler (the
    first ``borrowed[i][0]`` of them: the handler of instruction ``borrowed[i][1]``)."""
    borrowed = borrowed or {}
    for attr in _SAME:
        if getattr(old, attr) != getattr(new, attr):
            raise Unsupported(f"{attr} changed")
    old_units, new_units = _units(old), _units(new)
    if len(old_units) != len(expansion) or len(new_units) != sum(expansion):
        raise Unsupported("instruction count mismatch")
    first_new = [0]
    for k in expansion:
        first_new.append(first_new[-1] + k)
    old_handlers, new_handlers = _handlers(old, old_units), _handlers(new, new_units)
    old_pos, new_pos = _positions(old, old_units), _positions(new, new_units)
    for i, k in enumerate(expansion):
        lent, lender = borrowed.get(i, (0, i))
        for j in range(first_new[i], first_new[i] + k):
            want = old_handlers[lender if j - first_new[i] < lent else i]
            if want is not None:
                want = (first_new[want[0]],) + want[1:]
            if new_handlers[j] != want:
                raise Unsupported(f"exception handler of instruction {i} changed")
            if new_pos[j] != old_pos[i]:
                raise Unsupported(f"position of instruction {i} changed")
    lines = [None] * (len(new.co_code) // 2)  # (what tracebacks read: co_lines, not positions)
    for start, end, line in new.co_lines():
        lines[start // 2:end // 2] = [line] * ((end - start) // 2)
    if any(lines[off // 2] != pos[0] for off, pos in zip(new_units, new_pos)):
        raise Unsupported("line table disagrees with the positions")


def _real_instructions(code):
    """(offset, opname) of each instruction of ``code`` as ``dis`` lists them, without
    EXTENDED_ARG (nor CACHE), read straight from ``co_code`` (``dis.get_instructions``
    builds a full record per instruction: most of the rewriter's time)."""
    raw, out, k = code.co_code, [], 0
    while k < len(raw):
        op = raw[k]
        name = dis.opname[op]
        if op != EXTENDED_ARG:
            out.append((k, name))
        k += 2 + 2 * _cache_entries(op, name)
    return out


if isinstance(dis._inline_cache_entries, dict):  # 3.13: by name
    def _cache_entries(op, name):
        return dis._inline_cache_entries.get(name, 0)
else:
    def _cache_entries(op, name):
        return dis._inline_cache_entries[op]


def _units(code):
    return [offset for offset, _ in _real_instructions(code)]


def _index_of_offset(units):
    """Map any byte offset inside an instruction (or its EXTENDED_ARG prefix) to its index."""
    index, k = {}, 0
    for off in range(0, units[-1] + 2, 2):
        while k < len(units) and units[k] < off:
            k += 1
        index[off] = k
    return index


def _handlers(code, units):
    index = _index_of_offset(units)
    out = [None] * len(units)
    for e in dis._parse_exception_table(code):
        for off in range(e.start, e.end, 2):
            k = index.get(off)
            if k is not None and k < len(units) and units[k] == off:
                out[k] = (index[e.target], e.depth, e.lasti)
    return out


def _positions(code, units):
    positions = list(code.co_positions())
    return [positions[off // 2] for off in units]

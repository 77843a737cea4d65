"""HumanEval-style programs whose tests a completion cannot fool from inside.

The sandbox decides whether a program *ran to its end*; whether the tests in
it compared what the candidate really computed is decided here, when the
program is built. The plain HumanEval program
``prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"`` is fooled by

- a returned object whose ``__eq__`` always answers True (or an ``int`` /
  ``str`` / ``list`` subclass that overrides it, or ``__abs__``, ``__lt__``,
  ...): ``assert candidate(x) == y`` holds whatever ``y`` is;
- patched builtins (``builtins.abs = lambda v: 0``, ``builtins.isinstance``,
  ``builtins.type``, ``builtins.sum`` used by a prompt's helper, ...) and module
  globals that shadow them (``abs = lambda v: 0`` after the function);
- a redefinition of a helper of the prompt that the tests call (HumanEval/32's
  ``poly``, /38's ``encode_cyclic``).

:func:`guarded_program` keeps the convention's text and wraps ``check`` just
before the last line::

    <prompt><completion>
    <test>
    <the grader: def _rlhf_jax_grader(...)>
    check = _rlhf_jax_grader(check, '<entry_point>', <the prompt's source>)
    check(<entry_point>)

Nothing of the completion runs between the grader's definition and the tests,
and the grader's body uses only its arguments and literals, never a name the
completion could have rebound. When the tests start it

1. takes ``type``, ``int``, ``list``, ... from literals (``(0).__class__``),
   which no Python code can patch, and verifies the builtins module in place:
   every builtin function is a C function of that module under its own name
   (a C function's name and module cannot be forged), every type a static
   (non-heap) type of its name, the rest singletons or private names; any
   patched builtin fails the run (no honest solution patches builtins);
2. runs ``check`` (its code object) with private globals: a copy of the
   module's minus every name that shadows a builtin, a private copy of the
   verified builtins, the prompt's own definitions re-executed from its source
   (pristine helpers) and the entry point's name bound to the guarded candidate;
3. guards the candidate: after every call the builtins module must still be
   the verified one, and the returned value is rebuilt as a plain value -
   exact ``int``, ``float``, ``bool``, ``str``, ``None``, ``bytes``,
   ``complex`` and exact ``list``, ``tuple``, ``dict``, ``set``,
   ``frozenset`` of plain values, checked with the real ``type`` (a C-level
   subclass such as ``defaultdict`` or ``OrderedDict``, which no completion
   can define, is copied into its plain base) - or a ``TypeError`` is raised,
   so the test fails. Comparisons of plain values cannot be overridden. (A
   ``collections.Counter``, a namedtuple or any other Python-level class is
   refused like a hostile one: convert before returning.)

Why no prelude before the prompt: literals give the real types at any time,
and a builtin can be checked where it lives, so the program still starts with
``prompt + completion`` (the HumanEval text) and needs nothing the completion
could reach before the grader runs.

Limits: this closes the cheap hacks a policy finds by trial; it is not a
security boundary (the OS sandbox is). Not stopped: a completion that walks
frames (``sys._getframe``) into the grader, mutates a shared stdlib module that
a test imports (``math.isclose = ...``), or races the tests from a daemon thread.
"""
from __future__ import annotations

import functools

__all__ = ["guarded_program", "PLAIN_TYPES"]

PLAIN_TYPES = ("int", "float", "bool", "str", "NoneType", "bytes", "complex",
               "list", "tuple", "dict", "set", "frozenset")

# Runs after the completion's top-level code. Only arguments, locals and
# literals are used: any builtin or global name could have been rebound.
_GRADER = '''
def _rlhf_jax_grader(check, entry_name, prompt):
    T = (0).__class__.__class__
    STR, DICT, FN, BFN = ''.__class__, {}.__class__, (lambda: 0).__class__, [].append.__class__
    INT, FLOAT, BOOL, NONE = (0).__class__, (0.0).__class__, (True).__class__, (None).__class__
    BYTES, COMPLEX, LIST, TUPLE, SET = b''.__class__, (0j).__class__, [].__class__, ().__class__, {0}.__class__
    FLAGS, NAME, MRO = T.__dict__['__flags__'], T.__dict__['__name__'], T.__dict__['__mro__']
    NOT_IMPLEMENTED = (0).__eq__('')
    SITE = ('exit', 'quit', 'copyright', 'credits', 'license', 'help')
    assert T(check) is FN, 'grading harness: check is not a function'

    def builtins_module():
        scope = check.__globals__['__builtins__']
        scope = scope if T(scope) is DICT else scope.__dict__
        length = scope['len']
        assert T(length) is BFN and length.__name__ == 'len', 'builtins were patched at len'
        module = length.__self__  # a C function's module cannot be forged
        found = module.__dict__
        assert T(found) is DICT, 'builtins were patched'
        for k, v in found.items():
            assert T(k) is STR, 'builtins were patched'
            t = T(v)
            if t is BFN:
                ok = v.__name__ == k and (v.__self__ is module or k == 'open')
            elif k == '__import__' or k == '__build_class__':
                ok = False
            elif k[:1] == '_' or k in SITE:
                ok = True  # module data, private names and site's helpers: no test uses them
            elif t is T:  # static (C) types of their own name; ExceptionGroup is the one heap type
                ok = ((not FLAGS.__get__(v) & 512 or k == 'ExceptionGroup')
                      and (NAME.__get__(v) == k or k in ('IOError', 'EnvironmentError')))
            else:
                ok = v is None or v is True or v is False or v is ... or v is NOT_IMPLEMENTED
            assert ok, f'builtins were patched at {k!r}: the tests cannot be trusted'
        return found

    def run(entry):
        live = builtins_module()
        pristine = DICT(live)
        FROZENSET, TYPE_ERROR = pristine['frozenset'], pristine['TypeError']

        def unchanged():
            for k, v in pristine.items():
                if k[:1] != '_' and not (k in live and live[k] is v):
                    assert False, f'the candidate patched builtins at {k!r}: the tests cannot be trusted'

        def plain(v):
            t = T(v)
            if t is INT or t is FLOAT or t is BOOL or t is STR or t is NONE or t is BYTES or t is COMPLEX:
                return v
            if t is LIST:
                return [plain(x) for x in v]
            if t is TUPLE:
                return TUPLE([plain(x) for x in v])
            if t is DICT:
                return {plain(k): plain(x) for k, x in v.items()}
            if t is SET:
                return {plain(x) for x in v}
            if t is FROZENSET:
                return FROZENSET([plain(x) for x in v])
            if not FLAGS.__get__(t) & 512:  # a C subclass (defaultdict, OrderedDict): no Python code in it
                mro = MRO.__get__(t)
                if DICT in mro:
                    return {plain(k): plain(x) for k, x in DICT.items(v)}
                if LIST in mro:
                    return [plain(x) for x in LIST.__iter__(v)]
                if TUPLE in mro:
                    return TUPLE([plain(x) for x in TUPLE.__iter__(v)])
            raise TYPE_ERROR(f'the candidate returned a value of type {NAME.__get__(t)!r}: only exact int, '
                             'float, bool, str, None, bytes, complex and list/tuple/dict/set/frozenset of '
                             'them are graded')

        def candidate(*args, **kwargs):
            out = entry(*args, **kwargs)
            unchanged()
            return plain(out)

        scope = {}
        for k, v in check.__globals__.items():
            if T(k) is STR and (k[:2] == '__' or k not in pristine):
                scope[k] = v
        scope['__builtins__'] = DICT(pristine)
        if prompt is not None:
            pristine['exec'](pristine['compile'](prompt, '<prompt>', 'exec', 0, True), scope)
        scope[entry_name] = candidate
        tests = FN(check.__code__, scope, check.__name__, check.__defaults__, check.__closure__)
        tests.__kwdefaults__ = check.__kwdefaults__
        return tests(candidate)

    return run
'''


@functools.lru_cache(maxsize=4096)
def _module_source(prompt: str) -> str | None:
  """The prompt if it compiles on its own (so its helpers can be re-run), else None."""
  try:
    compile(prompt, "<prompt>", "exec", dont_inherit=True)
  except (SyntaxError, ValueError):
    return None
  return prompt


def guarded_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
  """The HumanEval-convention program, with a grader the completion cannot fool.

  ``prompt + completion + "\\n" + test``, the grader, then
  ``check(entry_point)``: it ends cleanly iff every assertion of ``check``
  holds, where - unlike in the plain convention - the candidate's return
  values are rebuilt as plain builtin values (anything else raises
  ``TypeError``), ``check`` sees verified builtins and the prompt's own
  helpers, and patched builtins fail the run (see the module docstring for
  what is and is not defended).

  Args:
    prompt: the function signature and docstring (with any helpers, imports).
    completion: text that continues the prompt (the function body).
    test: source defining ``check(candidate)``.
    entry_point: the name of the function under test.

  Returns:
    Python source to run in the sandbox.

  Raises:
    ValueError: an argument is not a str, or ``entry_point`` is not an identifier.
  """
  for name, value in (("prompt", prompt), ("completion", completion), ("test", test),
                      ("entry_point", entry_point)):
    if not isinstance(value, str):
      raise ValueError(f"{name} must be a str, got {type(value).__name__}")
  if not entry_point.isidentifier():
    raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
  source = _module_source(prompt)
  return (prompt + completion + "\n" + test + "\n" + _GRADER
          + f"check = _rlhf_jax_grader(check, {entry_point!r}, {source!r})\n"
          + f"check({entry_point})\n")

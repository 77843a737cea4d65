"""Test helper: run many trusted programs in few sandbox calls.

Each sandbox program execs a chunk of programs, each in a fresh namespace with
``__name__ == "__main__"``, and prints one pass flag per program (a program
passes iff it runs to its end without raising). This checks our own
canonical solutions and known-bad completions through the sandbox at a
fraction of the cost of one process per program; the one-process-per-program
path itself is covered by the smaller individual checks and the slow tests.
"""
import json

from rlhf_jax.execution import execute_many

_MARK = "@@BATCH@@"
_RUNNER = '''\
import json
PROGRAMS = {programs!r}
flags = []
for src in PROGRAMS:
    try:
        exec(compile(src, "<program>", "exec"), {{"__name__": "__main__"}})
        flags.append(True)
    except BaseException:
        flags.append(False)
print({mark!r} + json.dumps(flags))
'''


def batched_passes(programs, *, chunk=50, timeout_s=60.0):
  chunks = [programs[i:i + chunk] for i in range(0, len(programs), chunk)]
  runners = [_RUNNER.format(programs=list(c), mark=_MARK) for c in chunks]
  results = execute_many(runners, timeout_s=timeout_s, memory_mb=1024, cache=False)
  flags = []
  for c, r in zip(chunks, results):
    assert r.passed, (r.status, r.stderr[-500:])
    line = [l for l in r.stdout.splitlines() if l.startswith(_MARK)][-1]
    got = json.loads(line[len(_MARK):])
    assert len(got) == len(c)
    flags.extend(got)
  return flags

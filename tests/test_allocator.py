"""Re-executing the serving entry points under tcmalloc (jaxserve.allocator)."""

import os
import subprocess
import sys

import pytest

from jaxserve import allocator


class Exec(Exception):
    """Raised by the fake execve so the test sees what would have been executed."""


def _fake_execve(path: str, argv: list[str], env: dict[str, str]) -> None:
    raise Exec(path, argv, env)


def test_with_preload_puts_libraries_first_and_keeps_the_rest() -> None:
    assert allocator.with_preload({"A": "1"}, "/x.so")["LD_PRELOAD"] == "/x.so"
    env = allocator.with_preload({"LD_PRELOAD": "/old.so"}, "/x.so", "/y.so")
    assert env["LD_PRELOAD"] == "/x.so:/y.so:/old.so"


def test_reexec_runs_the_same_command_with_tcmalloc_preloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(os, "execve", _fake_execve)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    with pytest.raises(Exec) as e:
        allocator.reexec_under_tcmalloc()
    path, argv, env = e.value.args
    assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4"


@pytest.mark.parametrize("env", [{"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4"}, {allocator.ENV_SWITCH: "off"}])
def test_reexec_is_a_no_op_when_already_preloaded_or_switched_off(monkeypatch: pytest.MonkeyPatch,
                                                                  env: dict) -> None:
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(os, "execve", _fake_execve)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    allocator.reexec_under_tcmalloc()  # no Exec raised


def test_reexec_without_tcmalloc_keeps_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(os, "execve", _fake_execve)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    allocator.reexec_under_tcmalloc()


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="no libtcmalloc_minimal on this machine")
def test_a_real_reexec_maps_tcmalloc_and_keeps_the_arguments(tmp_path) -> None:
    script = tmp_path / "probe.py"
    script.write_text("import sys\nfrom jaxserve.allocator import reexec_under_tcmalloc\nreexec_under_tcmalloc()\n"
                      "print(sys.argv[1:], 'tcmalloc' in open('/proc/self/maps').read())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV_SWITCH)}
    out = subprocess.run([sys.executable, str(script), "a", "--b=1"], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "['a', '--b=1'] True"

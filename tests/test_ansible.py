"""The Ansible role and playbook, and the Vagrantfile that drives them.

What can run here runs for real: ``ansible-playbook --syntax-check``, the role applied to
``localhost`` inside a temporary directory (twice: the second run must change nothing), and
the Vagrantfile evaluated by Ruby against a recording stand-in for Vagrant's API (Vagrant
and nested VMs are not available here). The rest are structure checks that ansible-lint
would make.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from spice_libvirt.config import load_config
from spice_libvirt.hook.install import parse_shim, render_shim

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "ansible"
ROLE = ANSIBLE / "roles" / "spice_libvirt"
VAGRANTFILE = REPO / "vagrant" / "Vagrantfile"
BIN = Path(sys.executable).parent
ANSIBLE_PLAYBOOK = BIN / "ansible-playbook"
ANSIBLE_LINT = BIN / "ansible-lint"

needs_ansible = pytest.mark.skipif(
    not ANSIBLE_PLAYBOOK.exists(), reason="ansible-core not installed in the venv"
)


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _tasks(node: Any) -> list[dict[str, Any]]:
    """Every task dict in a tasks/handlers list, blocks flattened."""
    out: list[dict[str, Any]] = []
    for task in node or []:
        out.append(task)
        for key in ("block", "rescue", "always"):
            out += _tasks(task.get(key))
    return out


_TASK_KEYWORDS = {
    "name", "when", "register", "notify", "loop", "become", "environment", "changed_when",
    "failed_when", "delegate_to", "throttle", "tags", "listen", "vars", "block", "rescue",
    "always", "run_once", "ignore_errors",
}  # fmt: skip


def _module_of(task: dict[str, Any]) -> str | None:
    mods = [k for k in task if k not in _TASK_KEYWORDS]
    assert len(mods) <= 1, task
    return mods[0] if mods else None


def _all_role_tasks() -> list[tuple[Path, dict[str, Any]]]:
    files = [*sorted((ROLE / "tasks").glob("*.yml")), ROLE / "handlers" / "main.yml"]
    found = [(f, t) for f in files for t in _tasks(_load(f))]
    for play in _load(ANSIBLE / "site.yml"):
        for section in ("pre_tasks", "tasks", "post_tasks", "handlers"):
            found += [(ANSIBLE / "site.yml", t) for t in _tasks(play.get(section))]
    return found


# --- structure ------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = list(ANSIBLE.rglob("*.yml"))
    assert len(files) >= 10
    for f in files:
        assert _load(f) is not None, f


def test_tasks_are_named_and_use_fqcn_modules() -> None:
    tasks = _all_role_tasks()
    assert len(tasks) >= 15
    for path, task in tasks:
        assert task.get("name"), (path, task)
        module = _module_of(task)
        if module is not None and "block" not in task:
            assert module.startswith("ansible.builtin."), (path, module)


def test_variables_carry_the_role_prefix_and_have_argument_specs() -> None:
    defaults = _load(ROLE / "defaults" / "main.yml")
    role_vars = _load(ROLE / "vars" / "main.yml")
    for name in [*defaults, *role_vars]:
        assert name.startswith("spice_libvirt_"), name
    specs = _load(ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    assert set(defaults) <= set(specs), set(defaults) - set(specs)
    for name, spec in specs.items():
        if "default" in spec:
            assert defaults[name] == spec["default"], name
    for _path, task in _all_role_tasks():
        if "register" in task:
            assert task["register"].startswith("spice_libvirt_"), task


def test_notified_handlers_exist() -> None:
    handlers = {h["name"] for h in _load(ROLE / "handlers" / "main.yml")}
    assert handlers == {"Restart libvirt"}
    for _path, task in _all_role_tasks():
        notify = task.get("notify")
        if notify:
            for n in [notify] if isinstance(notify, str) else notify:
                assert n in handlers, n


def test_role_never_writes_hooks_qemu() -> None:
    for path, task in _all_role_tasks():
        text = json.dumps(task)
        assert 'hooks/qemu"' not in text, path
        assert not re.search(r"hooks_dir \}\}/qemu[\"' ]", text), path
    hook = _tasks(_load(ROLE / "tasks" / "hook.yml"))
    dests = [t["ansible.builtin.template"]["dest"] for t in hook if "ansible.builtin.template" in t]
    assert dests == ["{{ spice_libvirt_hooks_dir }}/qemu.d/{{ spice_libvirt_hook_name }}"]
    assert {t.get("notify") for t in hook if "ansible.builtin.template" in t} == {"Restart libvirt"}


def test_inventory_matches_the_vagrantfile() -> None:
    ini = configparser.ConfigParser(allow_no_value=True, delimiters=(" ",))
    ini.optionxform = str  # type: ignore[assignment,method-assign]
    ini.read(ANSIBLE / "inventory" / "lab.ini")
    hosts: dict[str, dict[str, str]] = {}
    for group in ("hypervisors", "clients"):
        for name, value in ini.items(group):
            hosts[name] = dict(kv.split("=", 1) for kv in (value or "").split())
            hosts[name]["group"] = group
    text = VAGRANTFILE.read_text()
    for name, attrs in hosts.items():
        m = re.search(rf'"{name}"\s*=>\s*\{{\s*ip:\s*"([0-9.]+)".*group:\s*"(\w+)"', text)
        assert m, name
        assert m.group(1) == attrs["ansible_host"]
        assert m.group(2) == attrs["group"]
        assert attrs["spice_libvirt_lab_ip"] == attrs["ansible_host"]
        if attrs["group"] == "hypervisors":
            assert attrs["spice_libvirt_spice_address"] == attrs["ansible_host"]
    assert set(hosts) == {"hv1", "hv2", "client"}


# --- Vagrantfile, evaluated -----------------------------------------------------------

_VAGRANT_STUB = r"""
require 'json'
class Rec
  def initialize(store, path)
    @store = store
    @path = path
  end

  def method_missing(name, *args, **kw, &blk)
    key = name.to_s
    if key.end_with?("=")
      @store[(@path + [key.chomp("=")]).join(".")] = args[0]
      return nil
    end
    case key
    when "define"
      sub = {}
      (@store["machines"] ||= {})[args[0]] = sub
      blk&.call(Rec.new(sub, []))
    when "network"
      (@store["networks"] ||= []) << { "type" => args[0].to_s, "opts" => kw }
    when "provider", "provision"
      sub = { "type" => args[0].to_s }
      (@store[key] ||= []) << sub
      blk&.call(Rec.new(sub, []))
    when "synced_folder"
      (@store["synced_folders"] ||= []) << { "args" => args, "opts" => kw }
    else
      Rec.new(@store, @path + [key])
    end
  end

  def respond_to_missing?(*) = true
end

module Vagrant
  def self.configure(version)
    store = { "version" => version }
    yield Rec.new(store, [])
    puts JSON.generate(store)
  end
end

Dir.chdir(File.dirname(ARGV[0])) { load File.basename(ARGV[0]) }
"""


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed")
def test_vagrantfile_defines_the_lab(tmp_path: Path) -> None:
    stub = tmp_path / "vagrant_stub.rb"
    stub.write_text(_VAGRANT_STUB)
    proc = subprocess.run(
        ["ruby", str(stub), str(VAGRANTFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["vm.box"] == "generic/debian12"
    machines = cfg["machines"]
    assert list(machines) == ["hv1", "hv2", "client"]
    for name, m in machines.items():
        [net] = m["networks"]
        assert net["type"] == "private_network"
        assert net["opts"]["libvirt__network_name"] == "spice-lab"
        [prov] = m["provider"]
        assert prov["type"] == "libvirt"
        assert prov["nested"] is (name != "client")
        assert prov["cpu_mode"] == "host-passthrough"
    # provisioning runs once, from the last machine, over all of them
    assert "provision" not in machines["hv1"]
    assert "provision" not in machines["hv2"]
    [ans] = machines["client"]["provision"]
    assert ans["type"] == "ansible"
    assert ans["limit"] == "all"
    assert (VAGRANTFILE.parent / ans["playbook"]).resolve() == ANSIBLE / "site.yml"
    assert (VAGRANTFILE.parent / ans["config_file"]).resolve() == ANSIBLE / "ansible.cfg"
    assert ans["groups"] == {"hypervisors": ["hv1", "hv2"], "clients": ["client"]}
    for name in ("hv1", "hv2"):
        ip = machines[name]["networks"][0]["opts"]["ip"]
        assert ans["host_vars"][name] == {
            "spice_libvirt_lab_ip": ip,
            "spice_libvirt_spice_address": ip,
        }
    client_ip = machines["client"]["networks"][0]["opts"]["ip"]
    assert ans["host_vars"]["client"] == {"spice_libvirt_lab_ip": client_ip}


# --- ansible-playbook, for real --------------------------------------------------------


def _ansible_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
            "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"),
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
            "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
            "ANSIBLE_NOCOLOR": "1",
            "TMPDIR": str(tmp_path),
            "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        }
    )
    return env


@needs_ansible
def test_playbook_syntax_check(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "--syntax-check", "site.yml"],
        cwd=ANSIBLE,
        env=_ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "playbook: site.yml" in proc.stdout


@pytest.mark.skipif(not ANSIBLE_LINT.exists(), reason="ansible-lint not installed in the venv")
def test_ansible_lint_production_profile(tmp_path: Path) -> None:
    """What an admin's CI runs before rolling the role out; --offline: no Galaxy, no network."""
    env = _ansible_env(tmp_path)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["NO_COLOR"] = "1"
    proc = subprocess.run(
        [str(ANSIBLE_LINT), "--offline", "--profile", "production", "--nocolor"],
        cwd=ANSIBLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Profile 'production' was required, and it passed" in out, out[-2000:]


def _recap(output: str) -> dict[str, int]:
    m = re.search(r"localhost\s+:\s+(.*)", output)
    assert m, output[-2000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


@needs_ansible
@pytest.mark.slow
def test_role_applies_to_localhost_and_is_idempotent(tmp_path: Path) -> None:
    """Install into a sandbox: venv, wheel built from this tree, config, hook; then again."""
    sb = tmp_path / "sb"
    play = tmp_path / "play.yml"
    sandbox_vars = {
        "spice_libvirt_manage_packages": False,
        "spice_libvirt_restart_libvirt": False,
        "spice_libvirt_source_dir": str(REPO),
        "spice_libvirt_controller_wheel_dir": str(sb / "wheels"),
        "spice_libvirt_remote_source_dir": str(sb / "src"),
        "spice_libvirt_venv": str(sb / "venv"),
        "spice_libvirt_python": "/usr/bin/python3",
        "spice_libvirt_hooks_dir": str(sb / "hooks"),
        "spice_libvirt_config_dir": str(sb / "etc"),
        "spice_libvirt_journal_path": str(sb / "lib" / "journal.sqlite3"),
        "spice_libvirt_spice_address": "192.0.2.50",
        "spice_libvirt_fail_closed": True,
        "spice_libvirt_hook_timeout_s": 1.2,
    }
    play.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "spice_libvirt role in a sandbox",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars": sandbox_vars,
                    "roles": ["spice_libvirt"],
                }
            ]
        )
    )
    cmd = [
        str(ANSIBLE_PLAYBOOK),
        "-i",
        "localhost,",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        str(play),
    ]
    env = _ansible_env(tmp_path)
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480, check=False)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    recap = _recap(first.stdout)
    assert recap["failed"] == 0
    assert recap["changed"] >= 5

    shim = sb / "hooks" / "qemu.d" / "50-spice-libvirt"
    hook_exe = sb / "venv" / "bin" / "spice-libvirt-hook"
    cfg = sb / "etc" / "config.toml"
    assert shim.stat().st_mode & 0o777 == 0o755
    assert shim.read_text() == render_shim(hook_exe, cfg)  # the same text the CLI writes
    assert parse_shim(shim.read_text()) == (hook_exe, cfg)
    assert not (sb / "hooks" / "qemu").exists()
    settings = load_config(cfg)
    assert settings.spice_address == "192.0.2.50"
    assert settings.fail_closed is True
    assert settings.hook_timeout_s == 1.2
    assert settings.journal_path == sb / "lib" / "journal.sqlite3"
    # the verify step ran the self-test through the installed venv: it left its row
    assert settings.journal_path.exists()

    # the installed hook works from the shim, in a libvirt-like environment
    xml = (
        "<domain><name>g</name><uuid>00000000-0000-4000-8000-000000000001</uuid><devices>"
        "<graphics type='spice' listen='198.51.100.9'/></devices></domain>"
    )
    proc = subprocess.run(
        [str(shim), "g", "migrate", "begin", "-"],
        input=xml,
        capture_output=True,
        text=True,
        env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
        timeout=10,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert 'listen="192.0.2.50"' in proc.stdout

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480, check=False)
    assert second.returncode == 0, second.stdout[-4000:]
    assert _recap(second.stdout)["changed"] == 0, second.stdout[-4000:]

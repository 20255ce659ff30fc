"""The Ansible role and playbooks, and the Vagrantfile that drives them: static checks.

What runs here: ``ansible-playbook --syntax-check`` for real (``ansible-lint --profile
production`` is a linter: ``scripts/test.sh`` runs it with ruff and mypy), the Vagrantfile evaluated by Ruby against a recording stand-in for
Vagrant's API, the controller's wheelhouse manifest, and the structure rules the role keeps
for production hosts (reload never restart, serial plays, tags, never VDSM's hooks/qemu).
The role's real runs (over ssh, check mode, idempotence, reload) are in
``tests/test_ansible_ssh.py``; it is never applied to this machine itself.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2
import pytest
import yaml  # type: ignore[import-untyped]

from spice_libvirt.hook.install import parse_shim, parse_shim_full, render_shim

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "ansible"
ROLE = ANSIBLE / "roles" / "spice_libvirt"
VAGRANTFILE = REPO / "vagrant" / "Vagrantfile"
BIN = Path(sys.executable).parent
ANSIBLE_PLAYBOOK = BIN / "ansible-playbook"
PLAYBOOKS = [ANSIBLE / "site.yml", ANSIBLE / "lab.yml", ANSIBLE / "evacuate.yml"]

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
    "always", "run_once", "ignore_errors", "check_mode", "delegate_facts", "loop_control", "max_fail_percentage",
}  # fmt: skip


def _module_of(task: dict[str, Any]) -> str | None:
    mods = [k for k in task if k not in _TASK_KEYWORDS]
    assert len(mods) <= 1, task
    return mods[0] if mods else None


def _all_role_tasks() -> list[tuple[Path, dict[str, Any]]]:
    files = [*sorted((ROLE / "tasks").glob("*.yml")), ROLE / "handlers" / "main.yml"]
    found = [(f, t) for f in files for t in _tasks(_load(f))]
    for book in PLAYBOOKS:
        for play in _load(book):
            for section in ("pre_tasks", "tasks", "post_tasks", "handlers"):
                found += [(book, t) for t in _tasks(play.get(section))]
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


def test_notified_handlers_exist_and_libvirt_is_only_reloaded() -> None:
    role_handlers = _load(ROLE / "handlers" / "main.yml")
    assert {h["listen"] for h in role_handlers if "listen" in h} == {"Reload libvirt"}
    service = [
        h["ansible.builtin.service"] for h in role_handlers if "ansible.builtin.service" in h
    ]
    assert [sv["state"] for sv in service] == ["reloaded"]
    known = {"Reload libvirt"} | {h["name"] for h in role_handlers}
    for play in _load(ANSIBLE / "lab.yml"):
        known |= {h["name"] for h in play.get("handlers") or []}
    for path, task in _all_role_tasks():
        notify = task.get("notify")
        for n in [notify] if isinstance(notify, str) else notify or []:
            assert n in known, (path, n)
    # nothing in the role restarts or stops libvirt; only lab.yml may.
    # The one restart is the agent's own (it releases its holds on SIGTERM first).
    restarts = [
        h["ansible.builtin.systemd_service"]
        for h in role_handlers
        if h.get("ansible.builtin.systemd_service", {}).get("state") == "restarted"
    ]
    assert [r["name"] for r in restarts] == ["spice-libvirt-agent.service"]
    for path in sorted((ROLE / "tasks").glob("*.yml")):
        text = path.read_text()
        assert "restarted" not in text, path
        assert "stopped" not in text, path


def test_site_yml_is_the_role_and_nothing_else() -> None:
    """The playbook an operator runs: no task, handler or variable of its own that could
    touch libvirtd's configuration, listeners, /etc/hosts or the daemon itself (the role's
    own rules are the tests above; tests/test_ansible_ssh.py checks the result on a host)."""
    plays = _load(ANSIBLE / "site.yml")
    assert [p["hosts"] for p in plays] == ["hypervisors", "clients"]
    for play in plays:
        assert [r["role"] for r in play["roles"]] == ["spice_libvirt"], play["name"]
        for section in ("pre_tasks", "tasks", "post_tasks", "handlers"):
            assert section not in play, (play["name"], section)
    [hypervisors, clients] = plays
    assert "vars" not in hypervisors  # the role's defaults, as documented
    assert clients["vars"]["spice_libvirt_install_hook"] is False
    assert clients["vars"]["spice_libvirt_agent"] is False
    text = (ANSIBLE / "site.yml").read_text()
    for word in ("libvirtd.conf", "qemu.conf", "tcp", "/etc/hosts", "restart", "lab_"):
        assert word not in text.split("\n\n", 1)[1], word  # past the header comment


def test_lab_yml_refuses_unmarked_hosts_before_anything_runs() -> None:
    gate, *rest = _load(ANSIBLE / "lab.yml")
    assert gate["any_errors_fatal"] is True
    assert gate["gather_facts"] is False
    [check] = gate["tasks"]
    assert check["ansible.builtin.assert"]["that"] == [
        "spice_libvirt_lab_host | default('') == 'vagrant'"
    ]
    assert {p["hosts"] for p in rest} == {gate["hosts"]}  # no host escapes the gate


def test_only_a_new_shim_reloads_libvirt() -> None:
    hook = _tasks(_load(ROLE / "tasks" / "hook.yml"))
    shims = [t for t in hook if "ansible.builtin.template" in t]
    assert [t.get("notify") for t in shims] == ["Reload libvirt", None]
    wheelhouse = " and spice_libvirt_install_method == 'wheelhouse'"  # the .deb writes its own
    assert [t["when"] for t in shims] == [
        "not spice_libvirt_shim_stat.stat.exists" + wheelhouse,
        "spice_libvirt_shim_stat.stat.exists" + wheelhouse,
    ]
    config = _tasks(_load(ROLE / "tasks" / "config.yml"))
    assert not [t for t in config if t.get("notify")]


def test_plays_that_touch_libvirtd_are_serial() -> None:
    """A fleet never has all its daemons in flux at once: every play that runs the role on
    hypervisors, and the evacuation, go in batches (lab.yml's lab-only play runs on all of
    a lab's VMs at once, before any agent starts)."""
    for book in PLAYBOOKS:
        for play in _load(book):
            runs_role = play["hosts"] == "hypervisors" and "roles" in play
            if runs_role or "evacuate_hosts" in str(play["hosts"]):
                assert "serial" in play, (book, play["name"])
    [evacuate] = [p for p in _load(ANSIBLE / "evacuate.yml") if "serial" in p]
    assert evacuate["serial"] == 1
    assert evacuate["max_fail_percentage"] == 0


def test_every_step_is_tagged() -> None:
    main = _load(ROLE / "tasks" / "main.yml")
    imports = [t for t in main if "ansible.builtin.import_tasks" in t]
    assert {t["ansible.builtin.import_tasks"] for t in imports} == {
        p.name for p in (ROLE / "tasks").glob("*.yml") if p.name != "main.yml"
    }
    tags = {tag for t in imports for tag in t["tags"]}
    assert tags == {"install", "config", "hook", "agent", "verify"}
    for t in main:
        assert t.get("tags"), t["name"]


def test_role_never_writes_hooks_qemu() -> None:
    for path, task in _all_role_tasks():
        text = json.dumps(task)
        assert 'hooks/qemu"' not in text, path
        assert not re.search(r"hooks_dir \}\}/qemu[\"' ]", text), path
    hook = _tasks(_load(ROLE / "tasks" / "hook.yml"))
    dests = {t["ansible.builtin.template"]["dest"] for t in hook if "ansible.builtin.template" in t}
    assert dests == {"{{ spice_libvirt_hooks_dir }}/qemu.d/{{ spice_libvirt_hook_name }}"}


def _render(template: str, **variables: Any) -> str:
    """A role template rendered as Ansible would (trailing newline kept, ``quote`` filter)."""
    env = jinja2.Environment(
        keep_trailing_newline=True, trim_blocks=True, undefined=jinja2.StrictUndefined
    )
    env.filters["quote"] = shlex.quote
    return env.from_string((ROLE / "templates" / template).read_text()).render(
        ansible_managed="Ansible managed", **variables
    )


def test_vdsm_adapters_render_as_the_shipped_ones() -> None:
    """With the defaults, the role deploys exactly hooks/vdsm/*; other venvs are baked in."""
    defaults = _load(ROLE / "defaults" / "main.yml")
    points = _load(ROLE / "vars" / "main.yml")["spice_libvirt_vdsm_hook_points"]
    shipped = sorted(p.name for p in (REPO / "hooks" / "vdsm").iterdir() if p.name != "README.md")
    assert sorted(points) == shipped
    for point in points:
        text = _render(
            "vdsm-hook.sh.j2",
            spice_libvirt_vdsm_hook_point=point,
            spice_libvirt_venv=defaults["spice_libvirt_venv"],
            spice_libvirt_config_dir=defaults["spice_libvirt_config_dir"],
        )
        assert text == (REPO / "hooks" / "vdsm" / point).read_text(), point
    other = _render(
        "vdsm-hook.sh.j2",
        spice_libvirt_vdsm_hook_point=points[0],
        spice_libvirt_venv="/srv/sl venv",
        spice_libvirt_config_dir="/srv/etc",
    )
    assert 'exec "${SPICE_LIBVIRT_VENV:-/srv/sl venv}/bin/python3"' in other
    assert "SPICE_LIBVIRT_CONFIG=/srv/etc/config.toml\nexport SPICE_LIBVIRT_CONFIG\n" in other


def test_shim_template_is_what_the_cli_writes() -> None:
    for venv, cfg_dir in (("/opt/spice-libvirt", "/etc/spice-libvirt"), ("/srv/v", "/srv/etc")):
        text = _render(
            "qemu.d-hook.sh.j2", spice_libvirt_venv=venv, spice_libvirt_config_dir=cfg_dir
        )
        hook_exe = Path(venv) / "bin" / "spice-libvirt-hook"
        cfg = Path(cfg_dir) / "config.toml"
        # the default configuration file is not named: the hook finds it by itself
        cfg_arg = None if cfg_dir == "/etc/spice-libvirt" else cfg
        assert text == render_shim(hook_exe, cfg_arg)
        assert parse_shim(text) == (hook_exe, cfg_arg)
        # with the installed package's launcher known: the fast form `hook install` writes
        launcher = Path(venv) / "lib" / "python3.11" / "site-packages/spice_libvirt/hook/launch.py"
        fast = _render(
            "qemu.d-hook.sh.j2",
            spice_libvirt_venv=venv,
            spice_libvirt_config_dir=cfg_dir,
            spice_libvirt_hook_launcher=str(launcher),
        )
        python = Path(venv) / "bin" / "python"
        assert fast == render_shim(python, cfg_arg, launcher=launcher)
        assert parse_shim_full(fast) == (python, launcher, cfg_arg)


def _wheelhouse_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wheelhouse", ROLE / "files" / "wheelhouse.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_wheel(path: Path, record: str, date: tuple[int, int, int, int, int, int]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        name = path.name.split("-")[0] + "-" + path.name.split("-")[1]
        zf.writestr(zipfile.ZipInfo(f"{name}.dist-info/RECORD", date), record)
        zf.writestr(zipfile.ZipInfo(f"{name}.dist-info/METADATA", date), "Name: x\n")


def test_wheelhouse_manifest_follows_contents_not_timestamps(tmp_path: Path) -> None:
    wh = _wheelhouse_module()
    one, two = tmp_path / "one" / "wheels", tmp_path / "two" / "wheels"
    for d, date in ((one, (2020, 1, 1, 0, 0, 0)), (two, (2026, 11, 29, 10, 0, 0))):
        d.mkdir(parents=True)
        _fake_wheel(d / "spice_libvirt-0.1.0-py3-none-any.whl", "a.py,sha256=x,1\n", date)
        _fake_wheel(d / "rich-15.0.0-py3-none-any.whl", "r.py,sha256=y,1\n", date)
    assert (one / "spice_libvirt-0.1.0-py3-none-any.whl").read_bytes() != (
        two / "spice_libvirt-0.1.0-py3-none-any.whl"
    ).read_bytes()
    assert wh.manifest_of(one) == wh.manifest_of(two)
    assert [line.split("  ")[1] for line in wh.manifest_of(one).splitlines()] == [
        "rich-15.0.0-py3-none-any.whl",
        "spice_libvirt-0.1.0-py3-none-any.whl",
    ]
    _fake_wheel(
        two / "spice_libvirt-0.1.0-py3-none-any.whl", "a.py,sha256=z,1\n", (2026, 1, 1, 0, 0, 0)
    )
    assert wh.manifest_of(one) != wh.manifest_of(two)
    with pytest.raises(wh.WheelhouseError, match="missing"):
        wh.describe(one.parent)  # no tar: never built by wheelhouse.py
    assert wh.main(["--out", str(tmp_path / "none"), "--no-build"]) == 2


def test_constraints_pin_every_dependency() -> None:
    lines = [
        ln.strip()
        for ln in (ROLE / "files" / "constraints.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines
    for ln in lines:
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][^\s,;]*", ln), ln
    pinned = {re.split(r"==", ln)[0].lower().replace("_", "-").replace(".", "-") for ln in lines}
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.split(r"[<>=!~ \[;]", dep, maxsplit=1)[0].lower().replace(".", "-")
        assert name in pinned, dep


def test_inventory_matches_the_vagrantfile() -> None:
    """The hand-run inventory names the Vagrantfile's hypervisors at the same addresses
    (the Vagrant lab has no client VM: the machine running it is the SPICE client)."""
    ini = configparser.ConfigParser(allow_no_value=True, delimiters=(" ",))
    ini.optionxform = str  # type: ignore[assignment,method-assign]
    ini.read(ANSIBLE / "inventory" / "lab.ini")
    hosts: dict[str, dict[str, str]] = {}
    for name, value in ini.items("hypervisors"):
        hosts[name] = dict(kv.split("=", 1) for kv in (value or "").split())
    text = VAGRANTFILE.read_text()
    machines = re.findall(r'^\s*"(\w+)"\s*=>\s*\{\s*ip:', text, re.M)
    assert sorted(hosts) == sorted(machines) == ["hv1", "hv2"]
    for name, attrs in hosts.items():
        m = re.search(rf'"{name}"\s*=>\s*\{{\s*ip:\s*"([0-9.]+)".*group:\s*"(\w+)"', text)
        assert m, name
        assert m.group(1) == attrs["ansible_host"]
        assert m.group(2) == "hypervisors"
        assert attrs["spice_libvirt_lab_ip"] == attrs["ansible_host"]
        assert attrs["spice_libvirt_lab_host"] == "vagrant"
        assert attrs["spice_libvirt_spice_address"] == attrs["ansible_host"]


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


def _evaluate_vagrantfile(tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    stub = tmp_path / "vagrant_stub.rb"
    stub.write_text(_VAGRANT_STUB)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPICE_LIBVIRT_VAGRANT_")}
    proc = subprocess.run(
        ["ruby", str(stub), str(VAGRANTFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**clean, **env},
    )
    assert proc.returncode == 0, proc.stderr
    cfg: dict[str, Any] = json.loads(proc.stdout)
    return cfg


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed")
def test_vagrantfile_defines_the_lab(tmp_path: Path) -> None:
    from spice_libvirt_lab.vagrant_state import HOST_IPS, HOST_MACS

    cfg = _evaluate_vagrantfile(tmp_path, {})
    assert cfg["vm.box"] == "spice-libvirt/debian12"
    assert cfg["vm.box_check_update"] is False
    assert cfg["synced_folders"] == [{"args": [".", "/vagrant"], "opts": {"disabled": True}}]
    machines = cfg["machines"]
    assert list(machines) == ["hv1", "hv2"]
    for name, m in machines.items():
        assert m["vm.hostname"] == name
        # one isolated management network; the address is a DHCP reservation of its MAC
        assert "networks" not in m
        [prov] = m["provider"]
        assert prov["type"] == "libvirt"
        assert prov["uri"] == "qemu:///system"
        assert prov["management_network_name"] == "spice-lab"
        assert prov["management_network_mode"] == "none"
        assert prov["management_network_mac"] == HOST_MACS[name]
        # TCG by default: host-model is refused there, qemu64 carries svm
        assert (prov["driver"], prov["cpu_mode"], prov["cpu_model"]) == ("qemu", "custom", "qemu64")
        assert "nested" not in prov
    # by hand: provisioned once, from the last machine, over both (vagrant up --no-parallel)
    assert "provision" not in machines["hv1"]
    [ans] = machines["hv2"]["provision"]
    assert ans["type"] == "ansible"
    assert ans["limit"] == "all"
    assert (VAGRANTFILE.parent / ans["playbook"]).resolve() == ANSIBLE / "lab.yml"
    assert (VAGRANTFILE.parent / ans["config_file"]).resolve() == ANSIBLE / "ansible.cfg"
    assert ans["groups"] == {"hypervisors": ["hv1", "hv2"]}
    assert ans["extra_vars"] == {"spice_libvirt_apt_update_cache": False}
    for name, ip in HOST_IPS.items():
        assert ans["host_vars"][name] == {
            "spice_libvirt_lab_host": "vagrant",
            "spice_libvirt_lab_ip": ip,
            "spice_libvirt_spice_address": ip,
        }


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed")
def test_vagrantfile_takes_the_labs_choices(tmp_path: Path) -> None:
    """What lab/spice_libvirt_lab/vagrant_lab.py sets: its libvirtd, box, pool, network, KVM."""
    cfg = _evaluate_vagrantfile(
        tmp_path,
        {
            "SPICE_LIBVIRT_VAGRANT_LIBVIRT_URI": "qemu:///system?socket=/lab/libvirt-sock",
            "SPICE_LIBVIRT_VAGRANT_DRIVER": "kvm",
            "SPICE_LIBVIRT_VAGRANT_BOX": "spice-libvirt/debian12-0123",
            "SPICE_LIBVIRT_VAGRANT_POOL": "lab-pool",
            "SPICE_LIBVIRT_VAGRANT_SERIAL_DIR": "/lab/serial",
        },
    )
    assert cfg["vm.box"] == "spice-libvirt/debian12-0123"
    for m in cfg["machines"].values():
        [prov] = m["provider"]
        assert prov["uri"] == "qemu:///system?socket=/lab/libvirt-sock"
        assert prov["storage_pool_name"] == "lab-pool"
        assert (prov["driver"], prov["cpu_mode"], prov["nested"]) == (
            "kvm",
            "host-passthrough",
            True,
        )
        assert "cpu_model" not in prov


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
@pytest.mark.parametrize("book", ["site.yml", "lab.yml", "evacuate.yml"])
def test_playbook_syntax_check(tmp_path: Path, book: str) -> None:
    proc = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "--syntax-check", book],
        cwd=ANSIBLE,
        env=_ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"playbook: {book}" in proc.stdout

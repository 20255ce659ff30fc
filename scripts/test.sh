#!/usr/bin/env bash
# Set everything up and run the whole test suite against real QEMU, libvirtd, SPICE clients,
# then the linters (ruff, mypy, ansible-lint --profile production). Extra arguments go to
# pytest (e.g. scripts/test.sh -m "not libvirt").
# Exit status: 0 only if everything passed; pytest's "no tests collected" (5) is a failure,
# and so is any skipped test (tests/honest_skips.py lists them): a run that skipped the real
# QEMU/libvirt tests proved nothing. SPICE_LIBVIRT_ALLOW_SKIPS=1 accepts skips (still listed).
# The Vagrant lab's test (~10 min, two TCG VMs at nice 19, mostly waiting on them) runs too,
# beside the rest in a second pytest when no arguments are given (the run takes the longer
# of the two, not their sum; its output follows the rest's); SPICE_LIBVIRT_VAGRANT=0 leaves
# it out (and its packages out of setup); arguments given here run one pytest, as asked.
# Ctrl-C or SIGTERM reaches both pytests as SIGTERM (tests/conftest.py makes it an interrupt):
# each undoes what it started.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

bash scripts/setup.sh || exit 1

select=()
beside=()
if [ "${SPICE_LIBVIRT_VAGRANT:-1}" = 0 ]; then
    select=(-m "not vagrant")
elif [ "$#" -eq 0 ]; then
    select=(-m "not vagrant")
    beside=(-m vagrant)
fi
vagrant_log=$(mktemp) || exit 1
pids=()
interrupt() {
    kill -TERM "${pids[@]}" 2>/dev/null
    wait "${pids[@]}"
    cat "$vagrant_log"
    rm -f "$vagrant_log"
    exit 130
}
trap interrupt INT TERM
if [ "${#beside[@]}" -gt 0 ]; then
    # at nice 19 as a whole (vagrant, ansible, ssh too, not only its VMs): the rest's
    # timing-bound tests keep the CPU they would have alone
    nice -n 19 .venv/bin/pytest -q -p no:cacheprovider "${beside[@]}" >"$vagrant_log" 2>&1 &
    pids+=("$!")
fi
.venv/bin/pytest -q "${select[@]}" "$@" &
main=$!
pids+=("$main")
wait "$main"
status=$?
if [ "${#beside[@]}" -gt 0 ]; then
    wait "${pids[0]}"
    beside_status=$?
    echo "--- the Vagrant lab's test (run beside the rest) ---"
    cat "$vagrant_log"
    [ "$status" -ne 0 ] || status=$beside_status
fi
rm -f "$vagrant_log"
trap - INT TERM
if [ "$status" -eq 5 ]; then
    echo "test: pytest collected no tests; that is a failure" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "test: pytest failed (exit status $status; skipped tests count as failures" \
        "unless SPICE_LIBVIRT_ALLOW_SKIPS=1)" >&2
    exit "$status"
fi

.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
.venv/bin/mypy || exit 1
# the Ansible role as an admin's CI lints it; --offline: no Galaxy, no network
lint_home=$(mktemp -d) || exit 1
(
    cd ansible &&
        ANSIBLE_CONFIG="$PWD/ansible.cfg" ANSIBLE_ROLES_PATH="$PWD/roles" \
            ANSIBLE_HOME="$lint_home/home" ANSIBLE_LOCAL_TEMP="$lint_home/tmp" \
            XDG_CACHE_HOME="$lint_home/cache" TMPDIR="$lint_home" NO_COLOR=1 \
            PATH="$PWD/../.venv/bin:$PATH" \
            ../.venv/bin/ansible-lint --offline --profile production --nocolor
)
lint_status=$?
rm -rf "$lint_home"
[ "$lint_status" -eq 0 ] || exit 1

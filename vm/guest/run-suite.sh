#!/bin/sh
# Inside the test VM (as /mnt/ctl/cmd.sh runs it): the cgroup-dependent tests against a
# real worker on this cgroup v2 Docker host. Everything runs here: the VM has no network,
# so it starts its own Redis and moto on loopback and loads the runtime images that the
# host saved into the cache share (no registry).
#
# Results: /mnt/ctl/junit-<executor>.xml and /mnt/ctl/run/test-logs/; timings in
# /mnt/ctl/timings. Exit code: pytest's (the first non-zero of the executor passes).
set -u
CTL=/mnt/ctl
mark() { echo "$1 $(cut -d' ' -f1 /proc/uptime)" >>"$CTL/timings"; }
VENV=/opt/nanogrid-venv
SRC=/opt/src
. "$CTL/suite.env" # EXECUTORS, SLOWDOWN, PYTEST_ARGS (written by vm/test-cgroup2.sh)

echo "guest: $(cat /etc/nanogrid-vm-image), kernel $(uname -r), /sys/fs/cgroup is $(stat -fc %T /sys/fs/cgroup)"
docker info --format 'docker {{.ServerVersion}}: CgroupVersion={{.CgroupVersion}} CgroupDriver={{.CgroupDriver}} Storage={{.Driver}}'
docker info 2>&1 | grep -i '^WARNING' || true
docker info --format '{{.CgroupVersion}}' >"$CTL/cgroup-version"
docker version --format '{{.Server.Version}}' >"$CTL/docker-version"
uname -r >"$CTL/kernel"

if ! docker image inspect nanogrid-python:latest nanogrid-cpp:latest >/dev/null 2>&1; then
    echo "guest: runtime images not primed, loading them (slow under emulation)"
    docker load -i /mnt/cache/runtime-images.tar >/dev/null || { echo "guest: docker load failed"; exit 3; }
fi
mark images_loaded

mkdir -p "$SRC"
(cd /mnt/repo && tar --exclude=./.venv --exclude=./.git --exclude=./.run --exclude=./build \
    --exclude='*/__pycache__' -cf - .) | tar -C "$SRC" -xf -
mkdir -p "$CTL/run" # worker logs straight to the host, so a hung run still leaves them
ln -s "$CTL/run" "$SRC/.run"
redis-server --daemonize yes --save '' --appendonly no --bind 127.0.0.1 --port 6379 >/dev/null
"$VENV/bin/python" "$SRC/scripts/moto_server.py" -H 127.0.0.1 -p 5000 >/tmp/moto.log 2>&1 &
i=0
until "$VENV/bin/python" -c 'import socket; socket.create_connection(("127.0.0.1", 5000), 1)' 2>/dev/null; do
    i=$((i + 1))
    [ $i -gt 240 ] && { echo "guest: moto did not start"; cat /tmp/moto.log; exit 3; }
    sleep 0.5
done
mark services_ready

export PATH="$VENV/bin:$PATH" PYTHONPATH="$SRC"
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
export NANOGRID_TEST_SLOWDOWN="$SLOWDOWN"
cd "$SRC"
python -m compileall -q nanogrid_celery tests >/dev/null 2>&1 # once, not per process
rc=0
for ex in $EXECUTORS; do
    mark "tests_${ex}_start"
    # where every process sits (cgroup), once a minute: for post-mortems of a failed run
    (for n in 1 2 3 4 5 6 7 8; do
        sleep 60
        ps -eo pid,ppid,cgroup:90,args >"$CTL/ps-$ex-$n.txt" 2>/dev/null
    done) &
    snap=$!
    # shellcheck disable=SC2086
    NANOGRID_EXECUTOR=$ex python -m pytest -v --color=no -p no:cacheprovider -o timeout=900 -rfE \
        --junitxml="$CTL/junit-$ex.xml" $PYTEST_ARGS
    r=$?
    mark "tests_${ex}_end"
    kill $snap 2>/dev/null
    # the measured figures of this pass (peak memory, CPU time) from the result stream
    python - "$CTL/figures-$ex.txt" <<'PY'
import json, sys, redis
r = redis.Redis()
with open(sys.argv[1], "w") as out:
    for _id, e in r.xrange("nanogrid:results"):
        res = json.loads(e[b"result"])
        fn = (res.get("function") or "").rsplit("-", 1)[0]
        if res.get("status") == "success" and fn.startswith("test-"):
            peak = res.get("peak_memory_bytes")
            mib = "-" if peak is None else f"{peak / 2**20:.1f}"
            print(f"{fn:<22} peak={mib:>6} MiB  cpu={res.get('cpu_time_ms')} ms", file=out)
r.delete("nanogrid:results")
PY
    [ $rc -eq 0 ] && rc=$r
done
exit $rc

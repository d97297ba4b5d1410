#!/usr/bin/env bash
# The federation in containers, end to end, on a machine with no Docker engine running and no
# image registry (like CI's). As root:
#   1. install and start the engine from Debian's packages (if none is running);
#   2. build a base image with debootstrap when no registry answers (deploy/build-image.sh);
#   3. build the project image (deploy/Dockerfile; wheels from WHEELS_DIR served over HTTP);
#   4. run deploy/docker-compose.yml: encrypted inference (and its demo page), model-private inference
#      (3 compute parties with their own dealer on their own network; the owner uploads shares of its
#      model, a client sends MPC_COUNT test images in one batched query and gets labels only; party 1 is
#      restarted and all answer again from the shares on their state volumes), a
#      split-learning epoch, then FedAvg over secure aggregation during which compute party 1 is
#      stopped mid-round and restarted, then the coordinator is killed and started again (it resumes
#      its saved rounds); every step is checked;
#   5. tear everything down: containers, volumes, network, images and the engine it started.
# Environment: CLIENTS (3), ROUNDS (40), LOCAL_EPOCHS (2), MPC_COUNT (60), BASE_IMAGE, WHEELS_DIR (/opt/wheels),
# OUT (results/containers: the results volume is copied there), KEEP_ENGINE=1 (leave the engine
# and images for the next run).
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=securecollab-e2e
# Enough rounds that the coordinator is killed while training still runs: each round is ~3 s here (the
# norm check inside MPC), and the kill comes a few seconds after party 1 serves again, at round 3.
export CLIENTS=${CLIENTS:-3} ROUNDS=${ROUNDS:-40} LOCAL_EPOCHS=${LOCAL_EPOCHS:-2} NORM_BOUND=${NORM_BOUND:-50}
export MPC_COUNT=${MPC_COUNT:-60}
export SECURECOLLAB_IMAGE=securecollab:latest
OUT=${OUT:-$PWD/results/containers}
STARTED_ENGINE=0
IPTABLES_BEFORE=

say() { echo "[container-e2e $(date +%H:%M:%S)] $*"; }
fail() { say "FAILED: $*"; exit 1; }
compose() { docker-compose -p "$PROJECT" -f deploy/docker-compose.yml "$@"; }
cid() { compose ps -a -q "$1" | head -1; }

[ "$(id -u)" = 0 ] || fail "run as root (it installs and starts the Docker engine)"

teardown() {
    local rc=$?
    set +e
    if [ "$rc" != 0 ] && docker info >/dev/null 2>&1; then
        say "logs of the last run:"
        compose logs --no-color --tail 40 2>&1 | grep -v '^\s*$' | tail -150
    fi
    say "tearing down"
    if docker info >/dev/null 2>&1; then
        compose down -v --remove-orphans >/dev/null 2>&1
        [ -n "$(docker ps -q)" ] && say "containers still running: $(docker ps --format '{{.Names}}')"
    fi
    if [ "$STARTED_ENGINE" = 1 ] && [ "${KEEP_ENGINE:-0}" != 1 ]; then
        docker rmi -f "$SECURECOLLAB_IMAGE" securecollab-base:bookworm >/dev/null 2>&1
        docker image prune -f >/dev/null 2>&1  # the build's intermediate layers
        kill "$(cat /var/run/docker.pid 2>/dev/null)" 2>/dev/null
        for _ in $(seq 1 30); do pgrep -x dockerd >/dev/null || break; sleep 1; done
        pkill -f /var/run/docker/containerd/containerd.toml 2>/dev/null  # dockerd's own containerd
        # dockerd leaves its bridge and firewall rules behind: back to the rules from before it started
        ip link del docker0 2>/dev/null
        [ -s "$IPTABLES_BEFORE" ] && iptables-restore < "$IPTABLES_BEFORE"
        for table in filter nat; do
            if ! grep -q "^\*$table" "$IPTABLES_BEFORE"; then  # unused before: empty, default policies
                iptables -t "$table" -F
                [ "$table" = filter ] && iptables -P FORWARD ACCEPT
            fi
            chains=$(iptables -t "$table" -S | awk '/^-N DOCKER/ {print $2}')
            for c in $chains; do iptables -t "$table" -F "$c"; done  # all flushed before any is deleted
            for c in $chains; do iptables -t "$table" -X "$c"; done
        done
        pgrep -x dockerd >/dev/null && say "dockerd is still running"
    fi
    [ "$rc" = 0 ] && say "PASSED" || say "FAILED (exit $rc)"
}
trap teardown EXIT

# 1. The engine.
if ! docker info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
        say "installing docker.io, docker-compose, debootstrap from Debian's packages"
        deploy/apt-install docker.io docker-compose debootstrap iptables
    fi
    say "starting dockerd"
    IPTABLES_BEFORE=$(mktemp)
    iptables-save > "$IPTABLES_BEFORE"
    nohup dockerd >/tmp/securecollab-dockerd.log 2>&1 &
    STARTED_ENGINE=1
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || fail "dockerd did not start: $(tail -5 /tmp/securecollab-dockerd.log)"
fi
command -v docker-compose >/dev/null || fail "docker-compose is missing"

# 2-3. A base image (debootstrap when no registry answers) and the project image.
IMAGE=$SECURECOLLAB_IMAGE deploy/build-image.sh

# 4. The scenario.
compose down -v --remove-orphans >/dev/null 2>&1 || true
rm -rf "$OUT"

wait_exit() {  # wait_exit CONTAINER TIMEOUT: its exit code must be 0
    local code
    code=$(timeout "$2" docker wait "$1") || fail "$(docker inspect -f '{{.Name}}' "$1") still running after $2 s"
    [ "$code" = 0 ] || fail "$(docker inspect -f '{{.Name}}' "$1") exited with $code"
}
wait_log() {  # wait_log SERVICE PATTERN TIMEOUT
    local deadline=$((SECONDS + $3))
    # `docker logs`, bounded: `compose logs` once hung on a container restarting while it read (CI waited on it).
    # grep reads all of it: -q would stop at the first match, and under pipefail the reader's SIGPIPE fails the test
    until timeout 60 docker logs "$(cid "$1")" 2>&1 | grep "$2" >/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || fail "$1 did not log '$2' within $3 s"
        [ "$(docker inspect -f '{{.State.Running}}' "$(cid "$1")")" = true ] || fail "$1 exited before logging '$2'"
        sleep 0.5
    done
}
wait_healthy() {  # wait_healthy SERVICE TIMEOUT: its health check passes
    local deadline=$((SECONDS + $2))
    until [ "$(docker inspect -f '{{.State.Health.Status}}' "$(cid "$1")" 2>/dev/null)" = healthy ]; do
        [ "$SECONDS" -lt "$deadline" ] || fail "$1 not healthy within $2 s"
        sleep 2
    done
}
collect() { rm -rf "$OUT"; mkdir -p "$(dirname "$OUT")"; docker cp "$(cid certs):/results" "$OUT"; }
check() { python3 - "$OUT" "$@"; }

say "encrypted inference: HE server + client"
compose up -d he he-client >/dev/null 2>&1
wait_exit "$(cid he-client)" 900
collect
check <<'EOF'
import json, sys
r = json.load(open(f"{sys.argv[1]}/he/infer_client-0.json"))
print(f"  HE: {len(r['predictions'])} encrypted queries, accuracy {r['accuracy']:.3f}, argmax agreement with "
      f"the plaintext API {r['plain_agreement']:.3f}, max |logit error| {r['max_abs_error']:.1e}")
assert r["plain_agreement"] == 1.0 and r["max_abs_error"] < 0.05 and r["accuracy"] >= 0.8, r
EOF

say "encrypted inference from the demo page: he-web (the HE client serving it) in the federation"
export WEB_PORT=${WEB_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
compose up -d he-web >/dev/null 2>&1
python3 - "$WEB_PORT" <<'EOF' || fail "the demo page did not classify encrypted: $(compose logs --no-color he-web | tail -5)"
import json, sys, time, urllib.error, urllib.request
url, deadline = f"http://127.0.0.1:{sys.argv[1]}", time.monotonic() + 300
while True:  # the page serves once its client has made keys and opened a session
    try:
        page = urllib.request.urlopen(url + "/", timeout=10).read().decode()
        break
    except (urllib.error.URLError, ConnectionError):
        if time.monotonic() > deadline:
            raise
        time.sleep(1)
assert "Classify encrypted" in page
req = urllib.request.Request(url + "/api/classify", json.dumps({"index": 3}).encode(),
                             {"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=120))
print(f"  demo page: test image #3 classified {r['prediction']} encrypted ({r['bytes_sent'] / 1e3:.0f} KB up, "
      f"{r['bytes_received'] / 1e3:.0f} KB down, server {r['server_s']:.2f}s); plaintext API {r['plain']['prediction']}")
assert r["prediction"] == r["plain"]["prediction"] and r["plain"]["max_abs_difference"] < 0.05, r
EOF
compose stop he-web >/dev/null 2>&1

say "model-private inference: 3 compute parties + their own dealer, the owner's upload, $MPC_COUNT images batched"
mpc_started=$SECONDS
# mpc-client's dependencies come up first: infer-dealer, the parties (serving once their MPC world has
# formed), then mpc-owner, which must have uploaded its model before the client starts
compose up -d mpc-client >/dev/null 2>&1 || fail "the model-private inference deployment did not come up"
wait_exit "$(cid mpc-owner)" 10
wait_exit "$(cid mpc-client)" 300
owner=$(compose logs --no-color mpc-owner | grep -o '{"model_id".*}' | tail -1) || fail "mpc-owner printed no upload line"
collect
OWNER=$owner check <<'EOF'
import json, os, sys
out, n = f"{sys.argv[1]}/mpc", int(os.environ["MPC_COUNT"])
owner = json.loads(os.environ["OWNER"])  # the owner's last line: what it uploaded
r = json.load(open(f"{out}/infer_client-0.json"))
kinds = [json.loads(line).get("kind") for line in open(f"{out}/transcripts/client-0.jsonl")]
party_kinds = {i: {json.loads(line).get("kind") for line in open(f"{out}/transcripts/party-{i}.jsonl")}
               for i in range(3)}
print(f"  MPC: model {owner['model_id']} shared over {owner['parties']} parties (output {owner['output']}); "
      f"{len(r['predictions'])} images in {kinds.count('labels')} batched query, accuracy {r['accuracy']:.3f}; "
      f"client transcript: {sorted(k for k in set(kinds) if k)}")
assert owner["parties"] == 3 and owner["output"] == "label" and r["output"] == "label", (owner, r["output"])
assert len(r["predictions"]) == n and r["accuracy"] >= 0.8, r["accuracy"]
assert "labels" in kinds and "logits" not in kinds, kinds  # a label deployment: the client never sees logits
assert all("share" in k and not k & {"labels", "logits"} for k in party_kinds.values()), party_kinds
EOF
say "model-private inference: compute party 1 restarted; the parties form a new world and serve from their state volumes"
model_id=$(OWNER=$owner python3 -c 'import json, os; print(json.loads(os.environ["OWNER"])["model_id"])')
compose restart infer-party-1 >/dev/null 2>&1
for i in 0 1 2; do  # each party started again (a broken world sends the others out too) and read its share back
    wait_log "infer-party-$i" "holds model $model_id again" 300
    wait_healthy "infer-party-$i" 300
done
compose run --rm --no-deps --entrypoint rm mpc-client -f /results/mpc/infer_client-0.json >/dev/null 2>&1
compose up -d --no-deps --force-recreate mpc-client >/dev/null 2>&1  # no new upload: mpc-owner is not run
wait_exit "$(cid mpc-client)" 300
[ "$(compose logs --no-color mpc-owner | grep -c '{"model_id"')" = 1 ] || fail "mpc-owner uploaded again"
collect
check <<'EOF'
import json, os, sys
r = json.load(open(f"{sys.argv[1]}/mpc/infer_client-0.json"))
print(f"  MPC after the restart: {len(r['predictions'])} images, accuracy {r['accuracy']:.3f}, with no new upload")
assert len(r["predictions"]) == int(os.environ["MPC_COUNT"]) and r["accuracy"] >= 0.8, r["accuracy"]
EOF
compose rm -sf mpc-client mpc-owner infer-party-0 infer-party-1 infer-party-2 infer-dealer >/dev/null 2>&1
say "model-private inference: done in $((SECONDS - mpc_started)) s; its services removed"

say "split learning: one epoch, $CLIENTS clients in turn"
compose up -d --scale split-client="$CLIENTS" split split-client >/dev/null 2>&1
wait_exit "$(cid split)" 900
for c in $(compose ps -q split-client); do wait_exit "$c" 120; done
collect
check <<'EOF'
import json, os, sys
out, n = f"{sys.argv[1]}/split", int(os.environ["CLIENTS"])
acc = {r["client_id"]: r["test_accuracy"] for r in
       (json.load(open(f"{out}/{f}")) for f in os.listdir(out) if f.startswith("result_client-"))}
print(f"  split: test accuracy after one epoch {max(acc.values()):.3f} (chance 0.1); clients {sorted(acc)}")
assert sorted(acc) == [f"client-{i}" for i in range(n)] and max(acc.values()) >= 0.3, acc
assert os.path.exists(f"{out}/split_server_part.npz")
EOF

say "secure aggregation: $ROUNDS rounds, $CLIENTS clients, 3 compute parties + dealer"
compose up -d --scale client="$CLIENTS" party-0 party-1 party-2 dealer coordinator client >/dev/null 2>&1
wait_log coordinator "round 1: aggregated" 900
say "stopping compute party 1 mid-training"
compose stop -t 0 party-1 >/dev/null 2>&1
wait_log coordinator "aborted" 120
compose logs --no-color coordinator | grep -o 'round [0-9]* aborted: .*' | cut -c1-160 | sed 's/^/  coordinator: /'
say "restarting compute party 1"
compose start party-1 >/dev/null 2>&1
wait_log coordinator "compute parties serve again:" 300
say "killing the coordinator (SIGKILL) and starting it again: it must resume its saved rounds"
compose kill coordinator >/dev/null 2>&1
compose start coordinator >/dev/null 2>&1
wait_log coordinator "resuming from" 120
compose logs --no-color coordinator | grep -o 'resuming from .*' | cut -c1-160 | sed 's/^/  coordinator: /'
wait_exit "$(cid coordinator)" 900
for c in $(compose ps -q client); do wait_exit "$c" 120; done
collect
check <<'EOF'
import json, os, sys
out, n, rounds = f"{sys.argv[1]}/secagg", int(os.environ["CLIENTS"]), int(os.environ["ROUNDS"])
history = json.load(open(f"{out}/rounds_coordinator.json"))["history"]
aborted = [h for h in history if "aborted" in h]
done = [h for h in history if "included" in h]
acc = [json.load(open(f"{out}/result_client-{i}.json"))["test_accuracy"] for i in range(n)]
print(f"  secagg: {len(done)} rounds aggregated, {len(aborted)} aborted "
      f"(round {', '.join(str(h['round']) for h in aborted)}); client test accuracy {min(acc):.3f}")
assert aborted and all("party-1" in h["aborted"] for h in aborted), aborted
assert len(done) == rounds and done[-1]["round"] > aborted[-1]["round"], history
# the coordinator was killed and resumed: still one entry per round id, none repeated or skipped
assert [h["round"] for h in history] == list(range(len(history))), history
assert all(len(h["included"]) == n for h in done if h["round"] > aborted[-1]["round"]), history
assert min(acc) >= 0.8 and os.path.exists(f"{out}/secagg_model.npz"), acc
EOF
say "results copied to $OUT"

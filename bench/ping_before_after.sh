#!/bin/bash
# Bus PING round trips of two installs of vmsgamp (e.g. an older revision and
# this one), interleaved: the same two commands on each side, `vmsgamp serve`
# and `vmsgamp ping -n 2000 --json`, over shm: and over ivshmem:.
#
#   bash bench/ping_before_after.sh BEFORE_VENV AFTER_VENV [ROUNDS] [OUTDIR]
#
# Prints the median p50/p99 per side and region; the raw JSON stays in OUTDIR.
set -u
BEFORE=$1; AFTER=$2; R=${3:-5}; OUT=${4:-$(mktemp -d)}
mkdir -p "$OUT"
run() { # venv tag round
  . "$1/bin/activate"
  local tag=$2 r=$3 n=vmsgamp-ba-$$-$r-$2 sock=$OUT/ivshmem-$r-$2.sock
  (cd /tmp
   vmsgamp serve --region "shm:$n#create=1&size=1M&unlink=1" --devices rng --json > "$OUT/serve-shm-$tag-$r.json" 2>/dev/null & sp=$!
   for _ in $(seq 100); do [ -s "$OUT/serve-shm-$tag-$r.json" ] && break; sleep 0.1; done
   vmsgamp ping --region "shm:$n" -n 2000 --json > "$OUT/ping-shm-$tag-$r.json" 2>&1
   kill -TERM $sp; wait $sp
   vmsgamp ivshmem-server "$sock" --size 4M > /dev/null 2>&1 & ip=$!
   for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
   vmsgamp serve --region "ivshmem:$sock" --devices rng --json > "$OUT/serve-iv-$tag-$r.json" 2>/dev/null & sp=$!
   for _ in $(seq 100); do [ -s "$OUT/serve-iv-$tag-$r.json" ] && break; sleep 0.1; done
   vmsgamp ping --region "ivshmem:$sock" -n 2000 --json > "$OUT/ping-iv-$tag-$r.json" 2>&1
   kill -TERM $sp; wait $sp; kill -TERM $ip; wait $ip)
  deactivate
}
for r in $(seq "$R"); do
  run "$BEFORE" before "$r"
  run "$AFTER" after "$r"
done
python3 - "$OUT" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
for tag in ("before", "after"):
    for region in ("shm", "iv"):
        runs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/ping-{region}-{tag}-*.json"))]
        ok = [r for r in runs if "p50_us" in r]
        if not ok:
            print(f"{tag:6} {region:3}: no result ({runs[:1]})")
            continue
        p50 = statistics.median(r["p50_us"] for r in ok)
        p99 = statistics.median(r["p99_us"] for r in ok)
        print(f"{tag:6} {region:3}: p50 {p50:7.1f} us  p99 {p99:7.1f} us  ({len(ok)} runs)")
PY
echo "raw results in $OUT"

# Shared by run_all.sh and quality_set.sh (sourced, not run): a fresh OUT folder of our own, each
# benchmark timed into OUT/timings.txt, and the total against a budget.
#   begin_set OUT KIND SCRIPT   refuse OUT unless empty or made by SCRIPT (its marker's KIND), before any
#                               work; then the environment of scripts/setup_env.sh (made if missing), a fresh OUT
#   run NAME COMMAND...         run one benchmark, its log in OUT/NAME.log; stop the set if it fails
#   end_set BUDGET_MIN          the total wall time against the budget
begin_set() {
    OUT="$1"; local kind="$2" script="$3"
    # OUT is replaced only if this script made it (its marker); anything else of the user's is refused.
    local mark="$OUT/.megatron-twist-output"
    if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
        if ! grep -qs "\"kind\": \"$kind\"" "$mark"; then
            echo "error: $OUT exists and was not made by benchmarks/$script; nothing was written. Pass another OUT" >&2
            exit 2
        fi
        rm -rf "$OUT"
    fi
    bash scripts/setup_env.sh >/dev/null
    # shellcheck disable=SC1091
    . .venv/bin/activate
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
    mkdir -p "$OUT"
    echo "{\"kind\": \"$kind\"}" > "$mark"
    : > "$OUT/timings.txt"
    SET_START=$(date +%s)
    SET_NAME="${script%.sh}"
}

run() {  # name, command...
    local name="$1"; shift
    local start; start=$(date +%s)
    echo "[$SET_NAME] $name: $* (log: $OUT/$name.log)"
    "$@" > "$OUT/$name.log" 2>&1 || { echo "[$SET_NAME] $name FAILED; see $OUT/$name.log"; tail -20 "$OUT/$name.log"; exit 1; }
    local secs=$(( $(date +%s) - start ))
    printf '%-12s %6d s  %s\n' "$name" "$secs" "$*" | tee -a "$OUT/timings.txt"
}

end_set() {  # budget in minutes
    local total=$(( $(date +%s) - SET_START ))
    printf '%-12s %6d s  (%d min; budget %d min on 2 cores)\n' total "$total" $(( (total + 59) / 60 )) "$1" \
        | tee -a "$OUT/timings.txt"
}

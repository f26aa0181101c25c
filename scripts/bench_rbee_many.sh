# Sourced by bench_llama.sh and bench_slots.sh: the prompts their concurrent rows send and
# `rbee_many N MODEL`, N concurrent `rbee infer` of MODEL on `local`, printing the tokens
# generated and the wall ms. Needs RBEE, BUDGET, TOKENS and work set, and now_ms defined.
PROMPTS=("Write a long story about a dragon." "Write a long essay about bicycles."
         "Write a long story about the sea." "Write a long essay about copper.")
done_field() { python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])[sys.argv[2]])" "$@"; }
rbee_many() {
    local n=$1 model=$2 t0 t1 total=0 clients=()
    t0=$(now_ms)
    for i in $(seq 0 $((n - 1))); do
        "$RBEE" --json infer --node local --timeout "$BUDGET" --model "$model" --prompt "${PROMPTS[$((i % 4))]}" \
            --max-tokens "$TOKENS" --temperature 0 > "$work/c$i.json" &
        clients+=($!)
    done
    wait "${clients[@]}"
    t1=$(now_ms)
    for i in $(seq 0 $((n - 1))); do total=$((total + $(done_field "$work/c$i.json" tokens_out))); done
    echo "$total" $((t1 - t0))
}

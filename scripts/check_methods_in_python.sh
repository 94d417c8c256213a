#!/usr/bin/env bash
# Every adapter method trains and stays PEFT-compatible: on a seeded tiny Llama (hidden 64, 2 layers, SmolLM2's
# tokenizer) a short `peft train --adapter-config` run per method must lower the eval loss, and the saved adapter,
# loaded by Python PEFT (PeftModel.from_pretrained), must give the logits `peft eval --save-logits` gives
# (relative 1e-4, f32). Prints one table; exits non-zero on any FAIL. Needs the reference venv
# (bash ../shared/oracle/setup.sh). METHODS="lora ia3" limits the run to some methods.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PEFT_ORACLE_VENV:-$HOME/.cache/peft-oracle}/bin/python"
peft=target/release/peft
hf=target/smollm2-hf
tiny=target/tiny-llama-hf
out=target/methods
steps=12
data=data/shakespeare/train.txt

cargo build --release -q -p peft-cli || exit 1
if [ ! -f "$hf/tokenizer.json" ]; then
    gguf="$(bash scripts/fetch_smollm2.sh | tail -n 1)" || exit 1
    $peft convert --model "$gguf" --output "$hf" || exit 1
fi
[ -f "$tiny/model.safetensors" ] || "$py" scripts/check_methods_in_python.py build-tiny "$hf" "$tiny" || exit 1
mkdir -p "$out"

config() { # name -> adapter_config.json-style spec
    case "$1" in
    lora) echo '{"peft_type":"LORA","task_type":"CAUSAL_LM","r":4,"lora_alpha":8,"lora_dropout":0.0,"target_modules":["q_proj","v_proj"]}' ;;
    dora) echo '{"peft_type":"LORA","task_type":"CAUSAL_LM","r":4,"lora_alpha":8,"lora_dropout":0.0,"target_modules":"all-linear","use_dora":true}' ;;
    ia3) echo '{"peft_type":"IA3","task_type":"CAUSAL_LM"}' ;;
    adalora) echo "{\"peft_type\":\"ADALORA\",\"task_type\":\"CAUSAL_LM\",\"target_modules\":[\"q_proj\",\"v_proj\"],\"init_r\":6,\"target_r\":2,\"lora_alpha\":8,\"total_step\":$steps,\"tinit\":2,\"tfinal\":2,\"deltaT\":2}" ;;
    vera) echo '{"peft_type":"VERA","task_type":"CAUSAL_LM","r":16,"target_modules":["q_proj","v_proj"],"vera_dropout":0.0}' ;;
    prompt_tuning) echo '{"peft_type":"PROMPT_TUNING","task_type":"CAUSAL_LM","num_virtual_tokens":8,"prompt_tuning_init":"RANDOM"}' ;;
    prefix_tuning) echo '{"peft_type":"PREFIX_TUNING","task_type":"CAUSAL_LM","num_virtual_tokens":8,"prefix_projection":false}' ;;
    prefix_tuning_proj) echo '{"peft_type":"PREFIX_TUNING","task_type":"CAUSAL_LM","num_virtual_tokens":8,"prefix_projection":true,"encoder_hidden_size":32}' ;;
    loha) echo '{"peft_type":"LOHA","task_type":"CAUSAL_LM","r":4,"alpha":8,"target_modules":["q_proj","v_proj"]}' ;;
    lokr) echo '{"peft_type":"LOKR","task_type":"CAUSAL_LM","r":2,"alpha":8,"decompose_both":true,"target_modules":["q_proj","v_proj"]}' ;;
    oft) echo '{"peft_type":"OFT","task_type":"CAUSAL_LM","r":0,"oft_block_size":16,"target_modules":["q_proj","v_proj"]}' ;;
    boft) echo '{"peft_type":"BOFT","task_type":"CAUSAL_LM","boft_block_size":8,"boft_n_butterfly_factor":2,"target_modules":["q_proj","v_proj"]}' ;;
    p_tuning) echo '{"peft_type":"P_TUNING","task_type":"CAUSAL_LM","num_virtual_tokens":8,"encoder_reparameterization_type":"MLP","encoder_hidden_size":32}' ;;
    hra) echo '{"peft_type":"HRA","task_type":"CAUSAL_LM","r":8,"target_modules":["q_proj","v_proj"]}' ;;
    road) echo '{"peft_type":"ROAD","task_type":"CAUSAL_LM","variant":"road_1","group_size":8,"target_modules":["q_proj","v_proj"]}' ;;
    road_4) echo '{"peft_type":"ROAD","task_type":"CAUSAL_LM","variant":"road_4","group_size":16,"target_modules":["q_proj","v_proj","o_proj"]}' ;;
    delora) echo '{"peft_type":"DELORA","task_type":"CAUSAL_LM","r":4,"target_modules":["q_proj","v_proj"]}' ;;
    delora_patterns) echo '{"peft_type":"DELORA","task_type":"CAUSAL_LM","r":4,"delora_lambda":8,"rank_pattern":{"v_proj":2},"lambda_pattern":{"q_proj":4},"module_dropout":0.1,"target_modules":["q_proj","v_proj","down_proj"]}' ;;
    miss) echo '{"peft_type":"MISS","task_type":"CAUSAL_LM","r":16,"target_modules":["q_proj","v_proj"]}' ;;
    miss_bat) echo '{"peft_type":"MISS","task_type":"CAUSAL_LM","r":16,"init_weights":"bat","target_modules":["q_proj","v_proj"]}' ;;
    miss_mini) echo '{"peft_type":"MISS","task_type":"CAUSAL_LM","r":16,"mini_r":8,"init_weights":"mini","miss_dropout":0.1,"target_modules":["q_proj","v_proj","down_proj"]}' ;;
    gralora) echo '{"peft_type":"GRALORA","task_type":"CAUSAL_LM","r":8,"alpha":16,"gralora_k":2,"target_modules":["q_proj","v_proj"]}' ;;
    gralora_hybrid) echo '{"peft_type":"GRALORA","task_type":"CAUSAL_LM","r":8,"alpha":16,"gralora_k":4,"hybrid_r":2,"gralora_dropout":0.1,"target_modules":["q_proj","v_proj","down_proj"]}' ;;
    c3a) echo '{"peft_type":"C3A","task_type":"CAUSAL_LM","block_size":16,"target_modules":["q_proj","v_proj"]}' ;;
    c3a_pattern) echo '{"peft_type":"C3A","task_type":"CAUSAL_LM","block_size":8,"block_size_pattern":{"down_proj":32},"target_modules":["q_proj","v_proj","down_proj"]}' ;;
    vblora) echo '{"peft_type":"VBLORA","task_type":"CAUSAL_LM","r":4,"num_vectors":32,"vector_length":16,"topk":2,"target_modules":["q_proj","v_proj"]}' ;;
    vblora_topk) echo '{"peft_type":"VBLORA","task_type":"CAUSAL_LM","r":4,"num_vectors":300,"vector_length":16,"topk":3,"save_only_topk_weights":true,"vblora_dropout":0.1,"init_vector_bank_bound":0.1,"target_modules":["q_proj","v_proj","down_proj"]}' ;;
    fourierft) echo '{"peft_type":"FOURIERFT","task_type":"CAUSAL_LM","n_frequency":200,"scaling":150.0,"target_modules":["q_proj","v_proj"]}' ;;
    fourierft_pattern) echo '{"peft_type":"FOURIERFT","task_type":"CAUSAL_LM","n_frequency":100,"scaling":64.0,"random_loc_seed":3,"n_frequency_pattern":{"down_proj":500},"target_modules":["q_proj","v_proj","down_proj"]}' ;;
    hra_gs) echo '{"peft_type":"HRA","task_type":"CAUSAL_LM","r":4,"apply_GS":true,"target_modules":["q_proj","v_proj","down_proj"]}' ;;
    hira) echo '{"peft_type":"HIRA","task_type":"CAUSAL_LM","r":4,"target_modules":["q_proj","v_proj"]}' ;;
    hira_patterns) echo '{"peft_type":"HIRA","task_type":"CAUSAL_LM","r":4,"hira_dropout":0.1,"init_weights":"gaussian","target_modules":["q_proj","v_proj","down_proj","embed_tokens"]}' ;;
    beft) echo '{"peft_type":"BEFT","task_type":"CAUSAL_LM"}' ;;
    beft_all) echo '{"peft_type":"BEFT","task_type":"CAUSAL_LM","target_modules":["q_proj","k_proj","v_proj","o_proj","down_proj"]}' ;;
    glora) echo '{"peft_type":"GLORA","task_type":"CAUSAL_LM","r":4,"target_modules":["q_proj","v_proj"]}' ;;
    glora_vector) echo '{"peft_type":"GLORA","task_type":"CAUSAL_LM","config_A_B":"vector","target_modules":["q_proj","v_proj","down_proj"]}' ;;
    peanut) echo '{"peft_type":"PEANUT","task_type":"CAUSAL_LM","r":4,"target_modules":["q_proj","v_proj"]}' ;;
    peanut_deep) echo '{"peft_type":"PEANUT","task_type":"CAUSAL_LM","r":4,"depth":2,"act_fn":"gelu","scaling":0.5,"target_modules":["q_proj","v_proj","down_proj"]}' ;;
    supertuning) echo '{"peft_type":"SUPERTUNING","task_type":"CAUSAL_LM","sparsity":0.95,"target_modules":["q_proj","v_proj"]}' ;;
    supertuning_supra) echo '{"peft_type":"SUPERTUNING","task_type":"CAUSAL_LM","sparsity":0.98,"select_top":false,"r":2,"lora_alpha":4,"lora_dropout":0.1,"save_precomputed_indices":false,"target_modules":["q_proj","v_proj","down_proj"]}' ;;
    shira) echo '{"peft_type":"SHIRA","task_type":"CAUSAL_LM","r":2,"random_seed":5,"target_modules":["q_proj","v_proj"]}' ;;
    shira_default_seed) echo '{"peft_type":"SHIRA","task_type":"CAUSAL_LM","r":1,"target_modules":["q_proj","v_proj","down_proj"]}' ;;
    trainable_tokens) echo '{"peft_type":"TRAINABLE_TOKENS","task_type":"CAUSAL_LM","token_indices":[260,284,28,30,288,282,339,198]}' ;;
    trainable_tokens_random) echo '{"peft_type":"TRAINABLE_TOKENS","task_type":"CAUSAL_LM","token_indices":[260,28,198,957],"init_weights":false,"target_modules":["embed_tokens"]}' ;;
    lora_trainable_tokens) echo '{"peft_type":"LORA","task_type":"CAUSAL_LM","r":4,"lora_alpha":8,"lora_dropout":0.0,"target_modules":["q_proj","v_proj"],"trainable_token_indices":[260,284,28,30,288,282,339,198]}' ;;
    lora_trainable_tokens_map) echo '{"peft_type":"LORA","task_type":"CAUSAL_LM","r":4,"lora_alpha":8,"lora_dropout":0.0,"target_modules":["q_proj","v_proj","down_proj"],"trainable_token_indices":{"embed_tokens":[260,28,198],"lm_head":[30,957]}}' ;;
    pvera) echo '{"peft_type":"PVERA","task_type":"CAUSAL_LM","r":16,"target_modules":["q_proj","v_proj"]}' ;;
    pvera_no_projection) echo '{"peft_type":"PVERA","task_type":"CAUSAL_LM","r":16,"projection_prng_key":11,"save_projection":false,"target_modules":["q_proj","v_proj","o_proj"]}' ;;
    randlora) echo '{"peft_type":"RANDLORA","task_type":"CAUSAL_LM","r":8,"randlora_alpha":16,"target_modules":["q_proj","v_proj"]}' ;;
    randlora_2) echo '{"peft_type":"RANDLORA","task_type":"CAUSAL_LM","r":4,"randlora_alpha":8,"sparse":true,"save_projection":false,"projection_prng_key":3,"randlora_dropout":0.1,"target_modules":["q_proj","v_proj","down_proj"]}' ;;
    lora_orthogonal) echo '{"peft_type":"LORA","task_type":"CAUSAL_LM","r":4,"lora_alpha":8,"lora_dropout":0.0,"target_modules":["q_proj","v_proj"],"init_lora_weights":"orthogonal"}' ;;
    deft) echo '{"peft_type":"DEFT","task_type":"CAUSAL_LM","r":4,"alpha":8,"target_modules":["q_proj","v_proj"]}' ;;
    deft_qr_para) echo '{"peft_type":"DEFT","task_type":"CAUSAL_LM","r":2,"decomposition_method":"qr","para":true,"target_modules":["q_proj","v_proj","down_proj"]}' ;;
    unilora) echo '{"peft_type":"UNILORA","task_type":"CAUSAL_LM","r":4,"theta_d_length":256,"init_theta_d_bound":0.1,"target_modules":["q_proj","v_proj"]}' ;;
    unilora_saved) echo '{"peft_type":"UNILORA","task_type":"CAUSAL_LM","r":2,"theta_d_length":20000,"proj_seed":5,"save_indices":true,"unilora_dropout":0.1,"init_theta_d_bound":0.1,"target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]}' ;;
    frod) echo '{"peft_type":"FROD","task_type":"CAUSAL_LM","sparse_rate":0.02,"progressbar":false,"target_modules":["q_proj","v_proj"]}' ;;
    frod_2) echo '{"peft_type":"FROD","task_type":"CAUSAL_LM","sparse_rate":0.05,"projection_prng_key":9,"frod_dropout":0.1,"init_weights":false,"progressbar":false,"target_modules":["q_proj","k_proj","o_proj","down_proj"]}' ;;
    osf) echo '{"peft_type":"OSF","task_type":"CAUSAL_LM","target_modules":["q_proj","v_proj"]}' ;;
    osf_patterns) echo '{"peft_type":"OSF","task_type":"CAUSAL_LM","effective_rank":0.75,"rank_pattern":{"down_proj":60},"target_modules":["q_proj","k_proj","down_proj"]}' ;;
    pissa) echo '{"peft_type":"LORA","task_type":"CAUSAL_LM","r":4,"lora_alpha":8,"lora_dropout":0.0,"target_modules":["q_proj","v_proj"],"init_lora_weights":"pissa"}' ;;
    olora) echo '{"peft_type":"LORA","task_type":"CAUSAL_LM","r":4,"lora_alpha":16,"lora_dropout":0.0,"target_modules":["q_proj","v_proj","down_proj"],"init_lora_weights":"olora"}' ;;
    esac
}
lr_of() { case "$1" in prompt_tuning | prefix_tuning* | p_tuning | pvera* | trainable_tokens* | lora_trainable_tokens*) echo 5e-2 ;; *) echo 1e-2 ;; esac; }

methods=${METHODS:-"lora dora ia3 adalora vera loha lokr oft boft prompt_tuning prefix_tuning prefix_tuning_proj p_tuning hra hra_gs road road_4 delora delora_patterns miss miss_bat miss_mini gralora gralora_hybrid c3a c3a_pattern hira hira_patterns beft beft_all vblora vblora_topk glora glora_vector fourierft fourierft_pattern peanut peanut_deep supertuning supertuning_supra shira shira_default_seed pvera pvera_no_projection randlora randlora_2 trainable_tokens trainable_tokens_random lora_trainable_tokens lora_trainable_tokens_map pissa olora lora_orthogonal deft deft_qr_para unilora unilora_saved frod frod_2 osf osf_patterns"}
for m in $methods; do
    d="$out/$m"
    rm -rf "$d"
    mkdir -p "$d"
    config "$m" >"$d/adapter_config.in.json"
    echo "== $m: $(cat "$d/adapter_config.in.json")"
    # FRoD: PEFT builds the adapter (its bases are PEFT's own), peft-rs trains it (--init-adapter)
    start=(--adapter-config "$d/adapter_config.in.json")
    case "$m" in frod*)
        if ! "$py" scripts/check_methods_in_python.py init-adapter "$tiny" "$d/adapter_config.in.json" "$d/init" >"$d/init.log" 2>&1; then
            echo "   PEFT init failed:"; tail -n 5 "$d/init.log" | sed 's/^/   /'
            continue
        fi
        start=(--init-adapter "$d/init") ;;
    esac
    if ! $peft train --model "$tiny" --data "$data" "${start[@]}" --steps $steps \
        --batch-size 4 --seq-len 32 --lr "$(lr_of "$m")" --eval-max-examples 8 --quiet --output "$d" >"$d/train.log" 2>&1; then
        echo "   peft train failed:"; tail -n 5 "$d/train.log" | sed 's/^/   /'
        continue
    fi
    if ! $peft eval --model "$tiny" --adapter "$d/adapter" --data "$data" --seq-len 32 --batch-size 2 \
        --max-examples 2 --save-logits "$d/rust_logits.safetensors" >"$d/eval.log" 2>&1; then
        echo "   peft eval failed:"; tail -n 5 "$d/eval.log" | sed 's/^/   /'
    fi
done
echo
"$py" scripts/check_methods_in_python.py compare "$tiny" "$out" $methods

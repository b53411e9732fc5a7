#!/usr/bin/env bash
# The paper's DNA and audio experiments (sections 4.3, 4.4) at CPU scale,
# on the sets `selective data` builds (docs/DESIGN.md §16). Every point is
# one `selective pretrain` or `selective classify` run with seed 0; each
# writes results.json (settings, curve, held-out scores, wall time) into
# its own directory under OUT. Equal parameters: Mamba (S6 or S4D) 3 layers
# of d_model 64 (98.5K) against Transformer++ 2 layers of d_model 64 (101K).
#
#   scripts/dna_audio.sh OUT [dna-pretrain dna-classify audio-lm digits long]
#
# Needs DATA_DNA and DATA_SPEECH (directories from `selective data
# dna-apes` / `speech-digits`), default /work/data/dna-apes and
# /work/data/speech; SEL is the binary (default target/release/selective).
set -euo pipefail
OUT=${1:?usage: scripts/dna_audio.sh OUT [parts...]}
shift || true
PARTS=${*:-dna-pretrain dna-classify audio-lm digits}
SEL=${SEL:-target/release/selective}
DNA=${DATA_DNA:-/work/data/dna-apes}
SPEECH=${DATA_SPEECH:-/work/data/speech}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
run() { # name, then the command's arguments
    local name=$1; shift
    if [ -f "$OUT/$name/results.json" ]; then echo "have $name"; return; fi
    echo "== $name: $*"
    "$SEL" "$@" --out "$OUT/$name" --threads "$THREADS" 2>&1 | grep -v "^step [0-9]*/" | tail -4
}
MAMBA=(--d-model 64 --n-layer 3)
ATTN=(--layer attention --d-model 64 --n-layer 2 --n-head 4)

for part in $PARTS; do case $part in
dna-pretrain)
    # Figure 5 (left): next-nucleotide models of the human training
    # regions, 2^15 tokens a step for 100 steps at every context length.
    for L in 1024 4096 16384 32768; do
        B=$((32768 / L))
        for layer in s6 s4d; do
            run "dna-pre-$layer-$L" pretrain "$DNA" --layer $layer "${MAMBA[@]}" --seq-len $L --batch $B \
                --steps 100 --eval-every 50 --lr 4e-3 --eval-tokens 32768 --test-tokens 262144
        done
    done
    run "dna-pre-attention-1024" pretrain "$DNA" "${ATTN[@]}" --seq-len 1024 --batch 32 \
        --steps 100 --eval-every 50 --lr 4e-3 --eval-tokens 32768 --test-tokens 262144
    ;;
dna-classify)
    # Table 4: which of the four great apes a window comes from; max(2^15,
    # L) tokens a step for 60 steps; 32 test windows per species from the
    # test regions. Fine-tuned from the S6 model pretrained at 2^15.
    for L in 1024 4096 16384 65536; do
        B=$(( L >= 32768 ? 1 : 32768 / L ))
        common=(--window $L --batch $B --steps 60 --eval-every 60 --eval-windows 4 --test-windows 32)
        run "apes-s6-$L" classify "$DNA" --layer s6 "${MAMBA[@]}" "${common[@]}"
        run "apes-s4d-$L" classify "$DNA" --layer s4d "${MAMBA[@]}" "${common[@]}"
        run "apes-s6-pretrained-$L" classify "$DNA" --init "$OUT/dna-pre-s6-32768/model" "${common[@]}" --lr 1e-3
    done
    ;;
audio-lm)
    # Autoregressive 8-bit mu-law speech; test on held-out voices, in bits
    # per sample; four generated clips from the S6 model at 4096.
    for L in 1024 4096; do
        B=$((32768 / L))
        for layer in s4d s6; do
            gen=()
            if [ $layer = s6 ] && [ $L = 4096 ]; then gen=(--generate 4 --generate-samples 16000); fi
            run "audio-$layer-$L" pretrain "$SPEECH" --layer $layer "${MAMBA[@]}" --seq-len $L --batch $B \
                --steps 100 --eval-every 50 --lr 4e-3 --eval-tokens 32768 --test-tokens 262144 "${gen[@]}"
        done
    done
    run "audio-attention-1024" pretrain "$SPEECH" "${ATTN[@]}" --seq-len 1024 --batch 32 \
        --steps 100 --eval-every 50 --lr 4e-3 --eval-tokens 32768 --test-tokens 262144
    ;;
digits)
    # SC09-style: which digit a whole one-second clip (16,000 samples)
    # says, on voices never heard in training; 20 test clips per digit.
    common=(--batch 4 --steps 300 --eval-every 100 --eval-windows 5 --test-windows 20)
    run "digits-s6-tokens" classify "$SPEECH" --layer s6 "${MAMBA[@]}" "${common[@]}"
    run "digits-s4d-tokens" classify "$SPEECH" --layer s4d "${MAMBA[@]}" "${common[@]}"
    run "digits-s6-vectors" classify "$SPEECH" --layer s6 "${MAMBA[@]}" --input vectors "${common[@]}"
    ;;
long)
    # Six times the training of dna-pretrain at 2^15 (600 steps, 19.7M
    # tokens), then the test loss in windows of 2^10 ... 2^15 (the same
    # tokens at every length): does the model use context beyond 1K? Then
    # 600 classification steps at 2^10, from scratch and fine-tuned.
    for layer in s6 s4d; do
        run "dna-pre-long-$layer-32768" pretrain "$DNA" --layer $layer "${MAMBA[@]}" --seq-len 32768 --batch 1 \
            --steps 600 --eval-every 200 --lr 4e-3 --eval-tokens 32768 --test-tokens 262144 \
            --test-lengths 1024,2048,4096,8192,16384,32768
    done
    common=(--window 1024 --batch 32 --steps 600 --eval-every 200 --eval-windows 8 --test-windows 64)
    run "apes-long-s6-1024" classify "$DNA" --layer s6 "${MAMBA[@]}" "${common[@]}"
    run "apes-long-s6-pretrained-1024" classify "$DNA" --init "$OUT/dna-pre-long-s6-32768/model" "${common[@]}" --lr 1e-3
    ;;
*) echo "unknown part $part"; exit 2;;
esac; done

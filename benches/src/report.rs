//! Turns a [`Report`] into the markdown report and the SVG plots under `benches/results/`:
//! the figures next to the goals of the performance issue, each goal marked met or not.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::fleet::{
    Report, Sample, FLEET_LOWER, ONE_NODE, TRACING_OFF, TRACING_ON, TRACING_UNSAMPLED,
};
use crate::systems::System;

/// The hot-hit rows of the report and the bars of its plots, in order.
const HOT_ROWS: [(&str, System); 8] = [
    (ONE_NODE, System::Stratus),
    (ONE_NODE, System::Nginx),
    (ONE_NODE, System::Baseline),
    (FLEET_LOWER, System::Stratus),
    (FLEET_LOWER, System::Nginx),
    (TRACING_OFF, System::Stratus),
    (TRACING_UNSAMPLED, System::Stratus),
    (TRACING_ON, System::Stratus),
];

/// The median of `values` (0 when empty).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Medians over the rounds of one scenario and system.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Rounds.
    pub rounds: usize,
    /// Requests per second.
    pub rate: f64,
    /// CPU µs per request.
    pub cpu_us: f64,
    /// Latency quantiles, ms: p50, p90, p99, p99.9.
    pub latency_ms: [f64; 4],
    /// Smallest and largest CPU µs per request over the rounds.
    pub cpu_range: (f64, f64),
    /// Smallest and largest requests per second.
    pub rate_range: (f64, f64),
    /// Share of one core the measured process used during the round (below ~0.9, the load
    /// generator, not the process, set the rate).
    pub busy: f64,
}

/// Latency quantiles the report shows.
pub const QUANTILES: [(f64, &str); 4] =
    [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

/// The medians of `scenario` for `system`, if it ran.
pub fn summarize(samples: &[Sample], scenario: &str, system: System) -> Option<Summary> {
    let mine: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.scenario == scenario && s.system == system)
        .collect();
    if mine.is_empty() {
        return None;
    }
    let pick = |f: &dyn Fn(&Sample) -> f64| -> Vec<f64> { mine.iter().map(|s| f(s)).collect() };
    let range = |mut v: Vec<f64>| -> (f64, f64) {
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() - 1])
    };
    let mut latency_ms = [0.0; 4];
    for (i, (q, _)) in QUANTILES.iter().enumerate() {
        latency_ms[i] = median(&mut pick(&|s| s.load.latency_ms(*q)));
    }
    Some(Summary {
        rounds: mine.len(),
        rate: median(&mut pick(&|s| s.load.rate())),
        cpu_us: median(&mut pick(&|s| s.cpu_us_per_request())),
        latency_ms,
        cpu_range: range(pick(&|s| s.cpu_us_per_request())),
        rate_range: range(pick(&|s| s.load.rate())),
        busy: median(&mut pick(&|s| {
            s.cpu_secs / s.load.elapsed.as_secs_f64().max(1e-9)
        })),
    })
}

fn verdict(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "**not met**"
    }
}

/// The markdown report; `command` is the one that reproduces it, `plots` the SVG file names
/// written next to it.
pub fn markdown(r: &Report, command: &str) -> String {
    let mut md = String::new();
    let p = &r.plan;
    let _ = writeln!(md, "# stratus fleet benchmark\n");
    let _ = writeln!(md, "Reproduce: `{command}`\n");
    let _ = writeln!(md, "- machine: {}", r.machine);
    let _ = writeln!(md, "- nginx: {}", r.nginx_version);
    let _ = writeln!(
        md,
        "- plan: {} rounds of {} s per figure, alternating systems; {} keep-alive connections from one load-generator thread; {}-byte bodies; Zipf s = 1.0 over {} keys; {} objects for memory; whole run {:.0} s",
        p.rounds, p.secs, p.connections, p.body, p.zipf_keys, p.objects, r.wall.as_secs_f64()
    );
    let workers = "one worker (stratus `threads = 1`, nginx one process)";
    let _ = match r.cores {
        Some((load, node)) => writeln!(
            md,
            "- the measured process (the one node, or the fleet's lower) is pinned to core {node} with {workers}; the load generator, origin, span sink and the fleets' uppers share core {load}"
        ),
        None => writeln!(
            md,
            "- nothing pinned (fewer than two usable cores, or a smoke round); {workers}"
        ),
    };
    let _ = writeln!(
        md,
        "\n**Trust CPU per request** (user + system time of the measured process from `/proc/<pid>/stat`, divided by the requests answered): requests per second on this shared 2-core machine move with everything else that runs, and with the load generator's own speed; CPU per request much less. Figures are medians over the rounds, ranges in brackets.\n"
    );

    // Hot hit.
    let _ = writeln!(md, "## Hot hit (one cached {}-byte object)\n", p.body);
    let _ = writeln!(
        md,
        "| scenario | system | requests/s | CPU µs/request | core busy | p50 ms | p90 ms | p99 ms | p99.9 ms |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for (scenario, system) in HOT_ROWS {
        if let Some(s) = summarize(&r.samples, scenario, system) {
            let _ = writeln!(
                md,
                "| {scenario} | {} | {:.0} [{:.0}–{:.0}] | {:.1} [{:.1}–{:.1}] | {:.0}% | {:.2} | {:.2} | {:.2} | {:.2} |",
                system.name(),
                s.rate,
                s.rate_range.0,
                s.rate_range.1,
                s.cpu_us,
                s.cpu_range.0,
                s.cpu_range.1,
                s.busy * 100.0,
                s.latency_ms[0],
                s.latency_ms[1],
                s.latency_ms[2],
                s.latency_ms[3]
            );
        }
    }

    // Goals.
    let _ = writeln!(md, "\n## Goals\n");
    let _ = writeln!(md, "| goal | measured | verdict |\n|---|---|---|");
    let st = summarize(&r.samples, ONE_NODE, System::Stratus);
    let ng = summarize(&r.samples, ONE_NODE, System::Nginx);
    if let (Some(st), Some(ng)) = (st, ng) {
        let cpu = st.cpu_us / ng.cpu_us;
        let rate = st.rate / ng.rate;
        let p99 = st.latency_ms[2] / ng.latency_ms[2];
        let _ = writeln!(
            md,
            "| hot hit CPU/request ≤ 0.77× nginx | {cpu:.2}× ({:.1} vs {:.1} µs) | {} |",
            st.cpu_us,
            ng.cpu_us,
            verdict(cpu <= 0.77)
        );
        let _ = writeln!(
            md,
            "| hot hit requests/s ≥ 1.3× nginx | {rate:.2}× ({:.0} vs {:.0}; cores {:.0}% / {:.0}% busy{}) | {} |",
            st.rate,
            ng.rate,
            st.busy * 100.0,
            ng.busy * 100.0,
            if st.busy.min(ng.busy) < 0.9 {
                ": the load generator set a rate"
            } else {
                ""
            },
            verdict(rate >= 1.3)
        );
        let _ = writeln!(
            md,
            "| hot hit p99 no worse than nginx | {p99:.2}× ({:.2} vs {:.2} ms) | {} |",
            st.latency_ms[2],
            ng.latency_ms[2],
            verdict(p99 <= 1.0)
        );
    }
    if let (Some(st), Some(before)) = (st, summarize(&r.samples, ONE_NODE, System::Baseline)) {
        let _ = writeln!(
            md,
            "| (before/after) this build against `--baseline`, hot hit CPU/request | {:.2}× ({:.1} vs {:.1} µs) | see profile.md |",
            st.cpu_us / before.cpu_us,
            st.cpu_us,
            before.cpu_us
        );
    }
    if let (Some(one), Some(lower)) = (st, summarize(&r.samples, FLEET_LOWER, System::Stratus)) {
        let ratio = lower.cpu_us / one.cpu_us;
        let _ = writeln!(
            md,
            "| a fleet lower's hit as fast as one node's (CPU/request) | {ratio:.2}× ({:.1} vs {:.1} µs) | {} |",
            lower.cpu_us,
            one.cpu_us,
            verdict(ratio <= 1.05)
        );
    }
    let off = summarize(&r.samples, TRACING_OFF, System::Stratus);
    if let (Some(off), Some(on)) = (off, summarize(&r.samples, TRACING_ON, System::Stratus)) {
        let extra = on.cpu_us / off.cpu_us - 1.0;
        let _ = writeln!(
            md,
            "| tracing sampled 1.0 and exporting: ≤ 5% more CPU/request than off | {:+.1}% ({:.1} vs {:.1} µs) | {} |",
            extra * 100.0,
            on.cpu_us,
            off.cpu_us,
            verdict(extra <= 0.05)
        );
    }
    if let (Some(off), Some(un)) = (
        off,
        summarize(&r.samples, TRACING_UNSAMPLED, System::Stratus),
    ) {
        let extra = un.cpu_us / off.cpu_us - 1.0;
        let (lo, hi) = off.cpu_range;
        let _ = writeln!(
            md,
            "| tracing unsampled indistinguishable from off | {:+.1}% ({:.1} µs; off's rounds {lo:.1}–{hi:.1}) | {} |",
            extra * 100.0,
            un.cpu_us,
            if extra.abs() <= 0.03 {
                "**met**"
            } else if un.cpu_us >= lo && un.cpu_us <= hi {
                "**not shown**: within this run's noise (read the instruction counts, profile.md)"
            } else {
                "**not met**"
            }
        );
    }
    if let Some(m) = &r.memory {
        let o = m.overhead_per_object();
        let _ = writeln!(
            md,
            "| ≤ 512 B RSS per object beyond body and headers ({} objects) | {o:.0} B | {} |",
            m.objects,
            verdict(o <= 512.0)
        );
    }
    if let Some(c) = &r.capacity {
        let _ = writeln!(
            md,
            "| `capacity` respected within 5% by RSS | RSS grew {:.2}× capacity | {} |",
            c.ratio(),
            verdict(c.ratio() <= 1.05)
        );
    }
    for z in &r.zipf {
        let _ = writeln!(
            md,
            "| origin requests per distinct key, 2-tier, Zipf ({}) = 1.00 | {:.2} | {} |",
            z.system.name(),
            z.per_key(),
            if z.system == System::Stratus {
                verdict(z.origin_requests == z.load.distinct_keys)
            } else {
                "(reference)"
            }
        );
    }

    // Zipf.
    let _ = writeln!(md, "\n## Zipf load through a fresh two-tier fleet\n");
    let _ = writeln!(
        md,
        "| system | requests | errors | distinct keys | origin requests | per key | requests/s | p50 ms | p99 ms | p99.9 ms |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for z in &r.zipf {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.3} | {:.0} | {:.2} | {:.2} | {:.2} |",
            z.system.name(),
            z.load.requests,
            z.load.errors,
            z.load.distinct_keys,
            z.origin_requests,
            z.per_key(),
            z.load.rate(),
            z.load.latency_ms(0.5),
            z.load.latency_ms(0.99),
            z.load.latency_ms(0.999)
        );
    }

    // Memory.
    let _ = writeln!(md, "\n## Memory (stratus)\n");
    if let Some(m) = &r.memory {
        let _ = writeln!(
            md,
            "{} distinct objects of {} body + {} header bytes filled into a node with `capacity = \"2GiB\"`: RSS {:.1} → {:.1} MiB, {:.0} bytes per object, **{:.0} beyond body and headers**; the node reports {} objects stored.\n",
            m.objects,
            m.body,
            m.head,
            m.rss_before as f64 / 1048576.0,
            m.rss_after as f64 / 1048576.0,
            (m.rss_after.saturating_sub(m.rss_before)) as f64 / m.objects.max(1) as f64,
            m.overhead_per_object(),
            m.stored.map_or("?".to_string(), |s| s.to_string())
        );
    }
    if let Some(c) = &r.capacity {
        let _ = writeln!(
            md,
            "A node with `capacity = \"{} MiB\"` offered {:.0} MiB of objects: RSS {:.1} → {:.1} MiB, growth {:.2}× the capacity.\n",
            c.capacity / 1048576,
            c.offered as f64 / 1048576.0,
            c.rss_before as f64 / 1048576.0,
            c.rss_after as f64 / 1048576.0,
            c.ratio()
        );
    }
    let _ = writeln!(
        md,
        "Plots: `throughput.svg`, `cpu.svg`, `latency.svg` next to this file. The profile of the hot hit and the fixes it led to, each with before/after numbers: `profile.md`."
    );
    md
}

/// Writes the three SVG plots of `r` into `dir`.
pub fn plots(r: &Report, dir: &Path) -> anyhow::Result<()> {
    // Tracing off is the one-node stratus bar again.
    let bars: Vec<(String, System, Summary)> = HOT_ROWS
        .iter()
        .filter(|(sc, _)| *sc != TRACING_OFF)
        .filter_map(|(sc, sy)| {
            summarize(&r.samples, sc, *sy).map(|s| (short_label(sc, *sy), *sy, s))
        })
        .collect();
    bar_chart(
        &dir.join("throughput.svg"),
        "hot hit: requests per second (median)",
        &bars
            .iter()
            .map(|(l, sy, s)| (l.clone(), *sy, s.rate))
            .collect::<Vec<_>>(),
    )?;
    bar_chart(
        &dir.join("cpu.svg"),
        "hot hit: CPU µs per request of the measured process (median; lower is better)",
        &bars
            .iter()
            .map(|(l, sy, s)| (l.clone(), *sy, s.cpu_us))
            .collect::<Vec<_>>(),
    )?;
    latency_chart(&dir.join("latency.svg"), &bars)?;
    Ok(())
}

/// A label short enough to sit under its bar.
fn short_label(scenario: &str, system: System) -> String {
    match (scenario, system) {
        (TRACING_UNSAMPLED, _) => "unsampled".into(),
        (TRACING_ON, _) => "traced".into(),
        (FLEET_LOWER, sy) => format!("{} lower", sy.name()),
        (_, System::Baseline) => "before".into(),
        (_, sy) => sy.name().into(),
    }
}

fn colour(system: System) -> RGBColor {
    match system {
        System::Stratus => RGBColor(31, 119, 180),
        System::Nginx => RGBColor(44, 160, 44),
        System::Baseline => RGBColor(160, 160, 160),
    }
}

fn bar_chart(path: &Path, title: &str, bars: &[(String, System, f64)]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = bars.iter().map(|b| b.2).fold(0.0, f64::max) * 1.15 + 1e-9;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..bars.len()).into_segmented(), 0.0..top)?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, system, v))| {
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *v),
            ],
            colour(*system).filled(),
        );
        bar.set_margin(0, 0, 12, 12);
        bar
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, _, v))| {
        Text::new(
            format!("{v:.1}"),
            (SegmentValue::CenterOf(i), *v * 1.02 + top * 0.01),
            ("sans-serif", 13),
        )
    }))?;
    root.present()?;
    Ok(())
}

fn latency_chart(path: &Path, bars: &[(String, System, Summary)]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = bars.iter().flat_map(|b| b.2.latency_ms).fold(0.0, f64::max) * 1.15 + 1e-9;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "hot hit latency percentiles, ms (median over rounds)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0usize..QUANTILES.len() - 1, 0.0..top)?;
    chart
        .configure_mesh()
        .x_labels(QUANTILES.len())
        .x_label_formatter(&|i| QUANTILES.get(*i).map_or("", |q| q.1).to_string())
        .draw()?;
    let dashes = [0u32, 1, 2];
    for (n, (label, system, s)) in bars.iter().enumerate() {
        let style = ShapeStyle::from(colour(*system)).stroke_width(1 + dashes[n % 3]);
        chart
            .draw_series(LineSeries::new(
                s.latency_ms.iter().enumerate().map(|(i, v)| (i, *v)),
                style,
            ))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

//! `fleet-bench`: runs the fleet load benchmark and writes its report and plots.
//!
//!   fleet-bench --stratus target/release/stratus --out benches/results [--smoke] [--no-nginx] [--only hot|fleet|tracing|zipf|memory] [--baseline OLD-STRATUS]
//!               [--secs S] [--rounds N] [--objects N] [--command "how to reproduce"]

use std::path::PathBuf;

use anyhow::{bail, Context};
use stratus_benches::fleet::{self, Plan};
use stratus_benches::report;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut stratus = PathBuf::from("target/release/stratus");
    let mut out = PathBuf::from("benches/results");
    let (mut smoke, mut no_nginx) = (false, false);
    let mut only = None;
    let mut baseline = None;
    let (mut secs, mut rounds, mut objects) = (None, None, None);
    let mut command = "benches/fleet.sh".to_string();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--stratus" => stratus = PathBuf::from(value()?),
            "--out" => out = PathBuf::from(value()?),
            "--smoke" => smoke = true,
            "--no-nginx" => no_nginx = true,
            "--only" => only = Some(value()?),
            "--baseline" => baseline = Some(PathBuf::from(value()?)),
            "--secs" => secs = Some(value()?.parse::<f64>()?),
            "--rounds" => rounds = Some(value()?.parse::<usize>()?),
            "--objects" => objects = Some(value()?.parse::<u64>()?),
            "--command" => command = value()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let mut plan = if smoke {
        Plan::smoke(stratus)
    } else {
        Plan::full(stratus)
    };
    plan.skip_nginx = no_nginx;
    plan.only = only;
    plan.baseline = baseline;
    if let Some(s) = secs {
        if !(s.is_finite() && s > 0.0 && s <= 3600.0) {
            bail!("--secs must be a number of seconds in (0, 3600]");
        }
    }
    plan.secs = secs.unwrap_or(plan.secs);
    plan.rounds = rounds.unwrap_or(plan.rounds);
    plan.objects = objects.unwrap_or(plan.objects);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(fleet::run(&plan))?;
    std::fs::create_dir_all(&out)?;
    let md = report::markdown(&result, &command);
    std::fs::write(out.join("README.md"), &md)?;
    report::plots(&result, &out)?;
    print!("{md}");
    eprintln!("fleet-bench: report and plots in {}", out.display());
    Ok(())
}

//! The benchmark as a picture (SVG): latency against request rate, and
//! the distributions of TTFT and ITL.
//!
//! Four panels: TTFT p50/p99 and TPOT p50/p99 against request rate (one
//! point per run of a sweep; a run at rate `inf` is placed at its achieved
//! request throughput), and the CDFs of TTFT and of ITL of the last run.

use std::path::Path;

use plotters::prelude::*;

use super::report::RunReport;

/// Where a run sits on the rate axis: its configured rate, or for `inf`
/// the rate it achieved.
pub fn rate_x(run: &RunReport) -> f64 {
    let r = run.request_rate.as_f64();
    if r.is_finite() {
        r
    } else {
        run.metrics.request_throughput
    }
}

/// Points `(value, fraction <= value)` of the empirical CDF of `samples`.
pub fn cdf_points(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    sorted
        .into_iter()
        .enumerate()
        .map(|(i, v)| (v, (i + 1) as f64 / n))
        .collect()
}

fn axis_max(values: impl Iterator<Item = f64>) -> f64 {
    let m = values.filter(|v| v.is_finite()).fold(0.0, f64::max);
    if m > 0.0 { m * 1.1 } else { 1.0 }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// One line of a panel: its legend label, its points and its color.
type Series<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

fn latency_vs_rate(area: &Area<'_>, title: &str, series: [Series<'_>; 2]) -> anyhow::Result<()> {
    let x_max = axis_max(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)));
    let y_max = axis_max(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("request rate (req/s)")
        .y_desc("ms")
        .draw()?;
    for (label, points, color) in series {
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn cdf(area: &Area<'_>, title: &str, samples_s: &[f64], color: RGBColor) -> anyhow::Result<()> {
    let ms: Vec<f64> = samples_s.iter().map(|s| s * 1e3).collect();
    let points = cdf_points(&ms);
    let x_max = axis_max(ms.iter().copied());
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("ms")
        .y_desc("fraction of samples")
        .draw()?;
    chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
    Ok(())
}

/// Draws the runs of a benchmark into an SVG file at `path`.
pub fn draw(runs: &[RunReport], path: &Path) -> anyhow::Result<()> {
    let Some(last) = runs.last() else {
        anyhow::bail!("nothing to plot: no runs");
    };
    let root = SVGBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    let points = |f: fn(&RunReport) -> f64| -> Vec<(f64, f64)> {
        let mut p: Vec<(f64, f64)> = runs.iter().map(|r| (rate_x(r), f(r))).collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        p
    };
    latency_vs_rate(
        &panels[0],
        "TTFT vs request rate",
        [
            ("TTFT p50", points(|r| r.metrics.ttft.median_ms), BLUE),
            ("TTFT p99", points(|r| r.metrics.ttft.p99_ms), RED),
        ],
    )?;
    latency_vs_rate(
        &panels[1],
        "TPOT vs request rate",
        [
            ("TPOT p50", points(|r| r.metrics.tpot.median_ms), BLUE),
            ("TPOT p99", points(|r| r.metrics.tpot.p99_ms), RED),
        ],
    )?;
    let ok = || last.requests.iter().filter(|r| r.success);
    let ttfts: Vec<f64> = ok().map(|r| r.ttft_s).collect();
    let itls: Vec<f64> = ok().flat_map(|r| r.itl_s.iter().copied()).collect();
    let rate = last.request_rate;
    cdf(&panels[2], &format!("TTFT CDF (rate {rate})"), &ttfts, BLUE)?;
    cdf(
        &panels[3],
        &format!("ITL CDF (rate {rate})"),
        &itls,
        MAGENTA,
    )?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::arrivals::RequestRate;
    use crate::bench::metrics::Metrics;
    use crate::bench::record::RequestRecord;

    #[test]
    fn cdf_is_sorted_and_ends_at_one() {
        let p = cdf_points(&[3.0, 1.0, 2.0, 2.0]);
        assert_eq!(p, vec![(1.0, 0.25), (2.0, 0.5), (2.0, 0.75), (3.0, 1.0)]);
        assert!(cdf_points(&[]).is_empty());
    }

    fn run(rate: RequestRate, ttft_ms: f64) -> RunReport {
        let requests = (1..=10)
            .map(|i| RequestRecord {
                success: true,
                output_tokens: 3,
                ttft_s: ttft_ms / 1e3,
                e2e_s: 0.1,
                itl_s: vec![0.001 * i as f64; 2],
                ..Default::default()
            })
            .collect::<Vec<_>>();
        RunReport {
            request_rate: rate,
            burstiness: 1.0,
            max_concurrency: None,
            metrics: crate::bench::metrics::summarize(&requests, 1.0, None),
            node_work: None,
            requests,
        }
    }

    #[test]
    fn infinite_rate_sits_at_achieved_throughput() {
        let r = run(RequestRate::Infinite, 5.0);
        assert_eq!(rate_x(&r), 10.0);
        assert_eq!(rate_x(&run(RequestRate::PerSecond(2.0), 5.0)), 2.0);
        let _ = Metrics::default();
    }

    #[test]
    fn draws_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.svg");
        let runs = vec![
            run(RequestRate::PerSecond(1.0), 5.0),
            run(RequestRate::PerSecond(4.0), 9.0),
        ];
        draw(&runs, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("TTFT vs request rate"));
    }
}

//! `--flamegraph FILE.svg`: the folded stacks drawn by inferno, frame widths
//! in outstanding bytes.

use anyhow::Context as _;
use inferno::flamegraph::{self, Options, color::{BasicPalette, Palette}};

/// An SVG flame graph of `folded` lines (see `folded::lines`), sorted.
pub fn svg(folded: &[String], subtitle: &str) -> anyhow::Result<Vec<u8>> {
    let mut options = Options::default();
    options.title = "Outstanding memory".into();
    options.subtitle = Some(subtitle.into());
    options.count_name = "bytes".into();
    options.colors = Palette::Basic(BasicPalette::Mem);
    if folded.is_empty() {
        // inferno refuses an empty graph: say there is nothing, in SVG.
        return Ok(empty(&options.title, subtitle).into_bytes());
    }
    let mut out = Vec::new();
    flamegraph::from_lines(&mut options, folded.iter().map(String::as_str), &mut out)
        .context("rendering the flame graph")?;
    Ok(out)
}

fn empty(title: &str, subtitle: &str) -> String {
    format!(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"1200\" height=\"90\" xmlns=\"http://www.w3.org/2000/svg\">\n\
         <text x=\"600\" y=\"24\" text-anchor=\"middle\" font-size=\"17\">{}</text>\n\
         <text x=\"600\" y=\"48\" text-anchor=\"middle\" font-size=\"12\">{}</text>\n\
         <text x=\"600\" y=\"72\" text-anchor=\"middle\" font-size=\"12\">no outstanding allocations</text>\n\
         </svg>\n",
        escape(title),
        escape(subtitle)
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_the_stacks() {
        let lines = ["start_thread;child;fibonacci 81920".to_string(), "main;setup 4096".to_string()];
        let svg = String::from_utf8(svg(&lines, "pid 42 (app)").unwrap()).unwrap();
        assert!(svg.starts_with("<?xml"), "{}", &svg[..100]);
        assert!(svg.contains("<svg"), "{svg}");
        assert!(svg.contains("fibonacci (81,920 bytes"), "widths in bytes");
        assert!(svg.contains("pid 42 (app)"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn nothing_outstanding_is_still_an_svg() {
        let svg = String::from_utf8(svg(&[], "pid <1> & co").unwrap()).unwrap();
        assert!(svg.contains("no outstanding allocations"));
        assert!(svg.contains("pid &lt;1&gt; &amp; co"));
    }
}

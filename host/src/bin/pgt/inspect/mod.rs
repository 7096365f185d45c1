//! `pgt inspect`: a look inside pgt's wire bytes (a metadata blob, a message stream) and a
//! safetensors file's header, as aligned text or one JSON object. Malformed input still gets a
//! report of what could be read, and the first error.

mod leaves;
mod messages;
mod render;
mod safetensors;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use clap::{Args, ValueEnum};
use pgt_core::header::Limits;
use pgt_core::plan::TAG_HEADER;
use serde_json::{json, Value as Json};

/// What `pgt inspect` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Guess from the first bytes (and the `.safetensors` extension).
    Auto,
    /// A header message immediately followed by the metadata message (golden `valid_metadata` and
    /// `malformed` vectors).
    Metadata,
    /// Messages as one receiver gets them: `tag u64 LE | len u64 LE | bytes`, repeated.
    Stream,
    /// A safetensors file.
    Safetensors,
}

/// `pgt inspect` flags.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A pgt metadata blob, a message stream (as in tests/vectors) or a safetensors file.
    pub file: PathBuf,
    /// Print one JSON object instead of text (leaves in the form of tests/vectors/index.json, each
    /// with its `path`).
    #[arg(long)]
    pub json: bool,
    /// What FILE is.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// Bytes of the header message in a metadata blob (32, unless the file is malformed on purpose).
    #[arg(long)]
    pub header_len: Option<usize>,
    /// Also check the metadata as this receiving rank would (for streams: which receiver to run;
    /// default the first destination).
    #[arg(long)]
    pub rank: Option<u32>,
    /// With --rank: the sender the receiver expects (default: the metadata's source).
    #[arg(long)]
    pub source: Option<u32>,
    /// With --rank or a stream: the step the receiver expects.
    #[arg(long)]
    pub expect_step: Option<u64>,
    /// Override a decoding limit, e.g. `--limit max_leaves=2` (max_metadata_bytes, max_leaves,
    /// max_depth, max_ndim, max_total_bytes, max_messages); repeatable.
    #[arg(long = "limit", value_name = "NAME=N", value_parser = parse_limit)]
    pub limits: Vec<(String, u64)>,
}

fn parse_limit(s: &str) -> Result<(String, u64), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=N"))?;
    let value: u64 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    let name = name.trim().to_string();
    apply_limit(&mut Limits::default(), &name, value)?;
    Ok((name, value))
}

fn apply_limit(l: &mut Limits, name: &str, value: u64) -> Result<(), String> {
    let small = || u32::try_from(value).map_err(|_| format!("{name}={value} is too large"));
    match name {
        "max_metadata_bytes" => l.max_metadata_bytes = value,
        "max_leaves" => l.max_leaves = value,
        "max_depth" => l.max_depth = small()?,
        "max_ndim" => l.max_ndim = small()?,
        "max_total_bytes" => l.max_total_bytes = value,
        "max_messages" => l.max_messages = value,
        _ => return Err(format!("unknown limit {name:?}")),
    }
    Ok(())
}

impl InspectArgs {
    fn limits(&self) -> Limits {
        let mut l = Limits::default();
        for (name, value) in &self.limits {
            // Checked by the parser.
            let _ = apply_limit(&mut l, name, *value);
        }
        l
    }
}

/// What inspecting found: a JSON report (always, even for malformed input) and the first error.
struct Report {
    json: serde_json::Map<String, Json>,
    error: Option<anyhow::Error>,
}

impl Report {
    fn new(file: &Path, format: &str, file_bytes: u64) -> Report {
        let mut json = serde_json::Map::new();
        json.insert("file".into(), json!(file.display().to_string()));
        json.insert("format".into(), json!(format));
        json.insert("file_bytes".into(), json!(file_bytes));
        Report { json, error: None }
    }

    fn set(&mut self, key: &str, value: Json) {
        self.json.insert(key.into(), value);
    }

    /// Records a pgt-core error (the first one wins).
    fn core_error(&mut self, e: pgt_core::Error) {
        if self.error.is_some() {
            return;
        }
        let debug = format!("{e:?}");
        self.set(
            "error",
            json!({"name": e.name(), "debug": debug, "message": e.to_string()}),
        );
        self.error = Some(anyhow!("{debug}: {e}"));
    }

    /// Records any other error (the first one wins).
    fn other_error(&mut self, e: anyhow::Error) {
        if self.error.is_some() {
            return;
        }
        self.set(
            "error",
            json!({"name": null, "debug": null, "message": format!("{e:#}")}),
        );
        self.error = Some(e);
    }
}

/// `pgt inspect FILE`.
pub fn inspect(args: InspectArgs) -> Result<()> {
    let path = &args.file;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let file_bytes = file.metadata()?.len();
    let mut head = Vec::new();
    (&mut file).take(24).read_to_end(&mut head)?;
    let format = match args.format {
        Format::Auto => detect(&head, file_bytes, path),
        f => f,
    };
    let mut report = match format {
        Format::Safetensors => safetensors::inspect_safetensors(path, file_bytes),
        _ => {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            if format == Format::Stream {
                messages::inspect_stream(path, &bytes, &args)
            } else {
                messages::inspect_blob(path, &bytes, &args)
            }
        }
    };
    report.set("valid", json!(report.error.is_none()));
    let text = if args.json {
        serde_json::to_string_pretty(&Json::Object(report.json.clone()))? + "\n"
    } else {
        render::render(&report.json)
    };
    // A closed pipe (`pgt inspect … | head`) is not an error worth a panic.
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("cannot write to stdout");
        }
    }
    let name = path.display().to_string();
    match report.error {
        Some(e) if format!("{e:#}").contains(&name) => Err(e),
        Some(e) => Err(e.context(name)),
        None => Ok(()),
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A stream starts with the header record (tag 1); a safetensors file with its header's size and
/// `{`; anything else is taken for a metadata blob (whose first bytes are the magic, never tag 1).
fn detect(head: &[u8], file_bytes: u64, path: &Path) -> Format {
    if u64_at(head, 0) == Some(TAG_HEADER)
        && u64_at(head, 8).is_some_and(|len| len <= file_bytes - 16)
    {
        return Format::Stream;
    }
    if head.get(8) == Some(&b'{') && u64_at(head, 0).is_some_and(|n| n <= file_bytes - 8) {
        return Format::Safetensors;
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Format::Safetensors;
    }
    Format::Metadata
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats() {
        let p = Path::new("x.bin");
        let mut stream = 1u64.to_le_bytes().to_vec();
        stream.extend(24u64.to_le_bytes());
        assert_eq!(detect(&stream, 100, p), Format::Stream);
        assert_eq!(
            detect(b"PGT\0\x01\0\x01\0\x10\0\0\0", 40, p),
            Format::Metadata
        );
        assert_eq!(
            detect(b"PGX\0\x01\0\x01\0{\0\0\0", 140, p),
            Format::Metadata
        );
        let mut st = 2u64.to_le_bytes().to_vec();
        st.extend(b"{}");
        assert_eq!(detect(&st, 10, p), Format::Safetensors);
        assert_eq!(
            detect(b"", 0, Path::new("a.safetensors")),
            Format::Safetensors
        );
        assert_eq!(detect(b"", 0, p), Format::Metadata);
    }
}

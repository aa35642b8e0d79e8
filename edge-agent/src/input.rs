//! Reading samples: a GLUE-style TSV or CSV file with a header, JSON lines, or plain text
//! lines (a file or stdin).
//!
//! Input is read one line at a time with a bounded buffer, so a huge or endless line costs
//! `max_line_bytes` of memory, not its length. A line that cannot become a sample (empty, too
//! long, not UTF-8, malformed JSON, wrong column count, bad label) becomes an
//! [`InputRecord`] whose `text` is the error: it is reported in the output like any sample
//! and the run goes on.

use std::io::BufRead;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use serde::Deserialize;
use splitee_model::dataset::Columns;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// Tab-separated with a header naming a `sentence` column (optionally `label`, `index`).
    Tsv,
    /// Comma-separated with the same header; fields may be quoted (not across lines).
    Csv,
    /// One JSON object per line: `{"text": …, "id": …, "label": …}` (`sentence` is accepted
    /// for `text`; `id` and `label` are optional).
    Jsonl,
    /// One text per line.
    Lines,
}

impl InputFormat {
    /// From the file extension: `.tsv`, `.csv`, `.jsonl`/`.ndjson`; anything else is lines.
    pub fn detect(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("tsv") => Self::Tsv,
            Some("csv") => Self::Csv,
            Some("jsonl" | "ndjson") => Self::Jsonl,
            _ => Self::Lines,
        }
    }
}

/// One sample to answer, or the reason its line could not be one.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRecord {
    /// 1-based line number in the input.
    pub line: usize,
    /// The input's own id when it has one, else the line number.
    pub id: String,
    pub label: Option<usize>,
    pub text: Result<String, String>,
    /// When its answer is due (a `serve` request's deadline; none in batch mode): a sample not
    /// started by then is not run, and an offload still out then is answered on the device.
    pub deadline: Option<Instant>,
}

/// Reads up to `limit` samples of a labelled TSV file (its first lines), for tools and tests.
pub fn read_tsv_file(path: &Path, limit: usize) -> anyhow::Result<Vec<InputRecord>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the sentences {}", path.display()))?;
    let mut records = Vec::new();
    read(
        std::io::BufReader::new(file),
        InputFormat::Tsv,
        64 * 1024,
        path,
        |record| {
            records.push(record);
            records.len() < limit
        },
    )?;
    anyhow::ensure!(!records.is_empty(), "{} holds no sentence", path.display());
    Ok(records)
}

/// Reads samples from `reader`, calling `emit` for each until the input ends or `emit` returns
/// false. Fails only when the input as a whole is unusable (unreadable, or a header without a
/// `sentence` column).
pub fn read(
    reader: impl BufRead,
    format: InputFormat,
    max_line_bytes: usize,
    name: &Path,
    mut emit: impl FnMut(InputRecord) -> bool,
) -> anyhow::Result<()> {
    let mut lines = BoundedLines::new(reader, max_line_bytes);
    let columns = match format {
        InputFormat::Tsv | InputFormat::Csv => {
            let header = match lines.next_line().context("reading the header")? {
                None => anyhow::bail!("{}: empty input, expected a header line", name.display()),
                Some(Line::Text(header)) => header,
                Some(_) => anyhow::bail!("{}: the header line is unreadable", name.display()),
            };
            let fields = split(format, &header).map_err(|e| anyhow::anyhow!("header: {e}"))?;
            let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
            Some(Columns::from_header(&fields, name)?)
        }
        InputFormat::Jsonl | InputFormat::Lines => None,
    };
    let first = if columns.is_some() { 2 } else { 1 };
    for line_number in first.. {
        let Some(line) = lines.next_line().context("reading the input")? else {
            return Ok(());
        };
        let record = match line {
            Line::TooLong(bytes) => failed(
                line_number,
                format!("line of {bytes} bytes exceeds the limit of {max_line_bytes}"),
            ),
            Line::NotUtf8(error) => failed(line_number, format!("not UTF-8: {error}")),
            Line::Text(text) if text.trim().is_empty() => {
                failed(line_number, "empty line".to_owned())
            }
            Line::Text(text) => parse(format, columns.as_ref(), line_number, text),
        };
        if !emit(record) {
            return Ok(());
        }
    }
    unreachable!("the line counter does not overflow before the input ends")
}

fn failed(line: usize, error: String) -> InputRecord {
    InputRecord {
        line,
        id: line.to_string(),
        label: None,
        text: Err(error),
        deadline: None,
    }
}

fn parse(format: InputFormat, columns: Option<&Columns>, line: usize, text: String) -> InputRecord {
    match (format, columns) {
        (InputFormat::Lines, _) => InputRecord {
            line,
            id: line.to_string(),
            label: None,
            text: Ok(text),
            deadline: None,
        },
        (InputFormat::Jsonl, _) => match serde_json::from_str::<JsonSample>(&text) {
            Ok(sample) => InputRecord {
                line,
                id: sample
                    .id
                    .map_or_else(|| line.to_string(), |id| id.to_string()),
                label: sample.label,
                text: Ok(sample.text),
                deadline: None,
            },
            Err(error) => failed(line, format!("malformed JSON: {error}")),
        },
        (_, Some(columns)) => {
            let example = split(format, &text).and_then(|fields| {
                let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
                columns.example(line, &fields).map_err(|bad| bad.reason)
            });
            match example {
                Ok(example) => InputRecord {
                    line,
                    id: example.id,
                    label: example.label,
                    text: Ok(example.text),
                    deadline: None,
                },
                Err(error) => failed(line, error),
            }
        }
        (InputFormat::Tsv | InputFormat::Csv, None) => unreachable!("tables have columns"),
    }
}

fn split(format: InputFormat, line: &str) -> Result<Vec<String>, String> {
    match format {
        // GLUE's TSV files have no quoting: a quote is part of the text.
        InputFormat::Tsv => Ok(line.split('\t').map(str::to_owned).collect()),
        InputFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(false)
                .from_reader(line.as_bytes());
            match reader.records().next() {
                Some(Ok(record)) => Ok(record.iter().map(str::to_owned).collect()),
                Some(Err(error)) => Err(format!("malformed CSV: {error}")),
                None => Ok(Vec::new()),
            }
        }
        InputFormat::Jsonl | InputFormat::Lines => Ok(vec![line.to_owned()]),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSample {
    #[serde(alias = "sentence")]
    text: String,
    #[serde(default)]
    id: Option<JsonId>,
    #[serde(default)]
    label: Option<usize>,
}

/// A sample's id as JSON spells it: a number or a string (JSON lines, the `serve` API).
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum JsonId {
    Number(u64),
    Text(String),
}

impl std::fmt::Display for JsonId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JsonId::Number(n) => write!(f, "{n}"),
            JsonId::Text(s) => f.write_str(s),
        }
    }
}

enum Line {
    Text(String),
    /// The line's full length; only `max` bytes of it were kept in memory.
    TooLong(usize),
    NotUtf8(std::str::Utf8Error),
}

/// Lines of at most `max` bytes; longer ones are skipped to their end and reported.
struct BoundedLines<R> {
    reader: R,
    max: usize,
    buffer: Vec<u8>,
}

impl<R: BufRead> BoundedLines<R> {
    fn new(reader: R, max: usize) -> Self {
        Self {
            reader,
            max,
            buffer: Vec::new(),
        }
    }

    fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        self.buffer.clear();
        let mut length = 0;
        let mut saw_any = false;
        loop {
            let available = self.reader.fill_buf()?;
            if available.is_empty() {
                break;
            }
            saw_any = true;
            let (chunk, ended) = match available.iter().position(|&b| b == b'\n') {
                Some(end) => (&available[..end], true),
                None => (available, false),
            };
            let room = (self.max + 1).saturating_sub(self.buffer.len());
            self.buffer
                .extend_from_slice(&chunk[..chunk.len().min(room)]);
            length += chunk.len();
            let consumed = chunk.len() + usize::from(ended);
            self.reader.consume(consumed);
            if ended {
                break;
            }
        }
        if !saw_any {
            return Ok(None);
        }
        if self.buffer.last() == Some(&b'\r') && length <= self.max + 1 {
            self.buffer.pop();
            length -= 1;
        }
        if length > self.max {
            return Ok(Some(Line::TooLong(length)));
        }
        Ok(Some(match std::str::from_utf8(&self.buffer) {
            Ok(text) => Line::Text(text.to_owned()),
            Err(error) => Line::NotUtf8(error),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8], format: InputFormat, max: usize) -> anyhow::Result<Vec<InputRecord>> {
        let mut records = Vec::new();
        read(input, format, max, Path::new("test"), |r| {
            records.push(r);
            true
        })?;
        Ok(records)
    }

    #[test]
    fn tsv_rows_keep_ids_and_labels_and_bad_rows_become_errors() {
        let input = b"sentence\tlabel\ngood film\t1\n\nno label column\nbad\tpositive\r\nawful\t0";
        let records = read_all(input, InputFormat::Tsv, 100).unwrap();
        let summary: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r.line,
                    r.label,
                    r.text
                        .clone()
                        .map_err(|e| e.split(':').next().unwrap().to_owned()),
                )
            })
            .collect();
        assert_eq!(summary[0], (2, Some(1), Ok("good film".into())));
        assert_eq!(summary[1], (3, None, Err("empty line".into())));
        assert_eq!(records[2].text, Err("1 columns, the header has 2".into()));
        assert_eq!(
            records[3].text,
            Err("label \"positive\" is not a class index".into())
        );
        assert_eq!(summary[4], (6, Some(0), Ok("awful".into())));
        assert_eq!(records.len(), 5);
    }

    #[test]
    fn csv_fields_may_be_quoted() {
        let input = b"index,sentence,label\n7,\"fine, really\",1\n8,\"unterminated,0\n";
        let records = read_all(input, InputFormat::Csv, 100).unwrap();
        assert_eq!(records[0].id, "7");
        assert_eq!(records[0].text, Ok("fine, really".into()));
        assert!(records[1].text.is_err(), "{:?}", records[1]);
    }

    #[test]
    fn jsonl_lines_and_their_errors() {
        let input = b"{\"text\": \"a\", \"id\": 5, \"label\": 0}\n{\"sentence\": \"b\"}\n{\"text\": 3}\nnot json\n";
        let records = read_all(input, InputFormat::Jsonl, 100).unwrap();
        assert_eq!((records[0].id.as_str(), records[0].label), ("5", Some(0)));
        assert_eq!(records[1].text, Ok("b".into()));
        assert_eq!(records[1].id, "2");
        for bad in &records[2..] {
            assert!(
                bad.text.as_ref().unwrap_err().starts_with("malformed JSON"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn long_lines_and_invalid_utf8_are_per_line_errors() {
        let mut input = b"short\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100_000));
        input.extend(b"\n\xff\xfe bytes\nlast\n");
        let records = read_all(&input, InputFormat::Lines, 1000).unwrap();
        assert_eq!(records.len(), 4);
        assert_eq!(records[0].text, Ok("short".into()));
        assert_eq!(
            records[1].text,
            Err("line of 100000 bytes exceeds the limit of 1000".into())
        );
        assert!(
            records[2]
                .text
                .as_ref()
                .unwrap_err()
                .starts_with("not UTF-8")
        );
        assert_eq!(
            (records[3].line, records[3].text.clone()),
            (4, Ok("last".into()))
        );
    }

    #[test]
    fn a_table_without_a_sentence_column_is_rejected_whole() {
        let error = read_all(b"text\tlabel\na\t1\n", InputFormat::Tsv, 100).unwrap_err();
        assert!(format!("{error:#}").contains("sentence"), "{error:#}");
        assert!(read_all(b"", InputFormat::Tsv, 100).is_err());
    }

    #[test]
    fn formats_follow_the_extension() {
        assert_eq!(
            InputFormat::detect(Path::new("a/dev.tsv")),
            InputFormat::Tsv
        );
        assert_eq!(
            InputFormat::detect(Path::new("x.jsonl")),
            InputFormat::Jsonl
        );
        assert_eq!(
            InputFormat::detect(Path::new("notes.txt")),
            InputFormat::Lines
        );
    }
}

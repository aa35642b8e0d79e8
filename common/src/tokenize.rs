//! WordPiece tokenization with the `tokenizers` crate, configured the way the model was
//! trained rather than the way its `tokenizer.json` happens to ship.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use tokenizers::{PaddingParams, TruncationParams};

use crate::error::{Error, Result};
use crate::model::PaddingMask;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
}

/// One tokenized text.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoding {
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
    /// Token count before truncation, so callers can report what was cut.
    pub untruncated_len: usize,
}

/// Token ids of several texts, right-padded to the longest.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Row-major `[len(lengths), seq_len]`.
    pub ids: Vec<i64>,
    pub lengths: Vec<usize>,
    pub seq_len: usize,
}

impl Tokenizer {
    /// Loads `tokenizer.json`, truncating at `max_len` tokens (`[CLS]`/`[SEP]` or `<s>`/`</s>`
    /// included).
    ///
    /// MiniLM's and all-mpnet-base-v2's shipped `tokenizer.json` pad and truncate to 128 built
    /// in; both are replaced here: truncation moves to the model's real limit and padding is
    /// done per batch by [`Tokenizer::batch`], so a single text is never padded. The pad id is
    /// kept from the shipped padding (`[PAD]` = 0, `<pad>` = 1).
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let error = |message: String| Error::Tokenizer {
            path: path.to_owned(),
            message,
        };
        if !path.is_file() {
            return Err(Error::Io {
                path: PathBuf::from(path),
                error: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| error(e.to_string()))?;
        let pad_id = inner
            .get_padding()
            .map(|p: &PaddingParams| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .unwrap_or(0);
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| error(e.to_string()))?;
        Ok(Self { inner, pad_id })
    }

    /// The id padding positions are filled with (`[PAD]`).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn encode(&self, text: &str) -> Result<Encoding> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenize(e.to_string()))?;
        let untruncated_len = encoding.len()
            + encoding
                .get_overflowing()
                .iter()
                .map(|o| o.len() - 2)
                .sum::<usize>();
        Ok(Encoding {
            ids: encoding.get_ids().to_vec(),
            tokens: encoding.get_tokens().to_vec(),
            untruncated_len,
        })
    }

    /// Tokenizes and pads a batch of texts.
    pub fn batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<Batch> {
        let encodings = texts
            .iter()
            .map(|text| self.encode(text.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Batch::pad(
            encodings.iter().map(|e| e.ids.as_slice()),
            self.pad_id,
        ))
    }
}

impl Batch {
    /// Right-pads token-id sequences to the longest one.
    pub fn pad<'a>(sequences: impl Iterator<Item = &'a [u32]> + Clone, pad_id: u32) -> Self {
        let seq_len = sequences.clone().map(<[u32]>::len).max().unwrap_or(0);
        let mut ids = Vec::new();
        let mut lengths = Vec::new();
        for sequence in sequences {
            ids.extend(sequence.iter().map(|&id| i64::from(id)));
            ids.extend(std::iter::repeat_n(
                i64::from(pad_id),
                seq_len - sequence.len(),
            ));
            lengths.push(sequence.len());
        }
        Self {
            ids,
            lengths,
            seq_len,
        }
    }

    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Token ids `[batch, seq]` and, when any sequence is padded, its mask.
    pub fn to_tensors(&self, device: &Device) -> (Tensor<2, Int>, Option<PaddingMask>) {
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(self.ids.clone(), [self.len(), self.seq_len]),
            device,
        );
        let padded = self.lengths.iter().any(|&len| len != self.seq_len);
        let mask = padded.then(|| PaddingMask::from_lengths(&self.lengths, self.seq_len, device));
        (ids, mask)
    }
}

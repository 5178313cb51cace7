//! The local store of one journal partition: the source of truth for skip decisions while the
//! partition is assigned, with the journal topic as its changelog (Kafka Streams' model).
//!
//! - **One redb file per journal partition** (`<state_dir>/<topic>-<partition>.redb`). redb
//!   was chosen over fjall and RocksDB on measured figures (see ARCHITECTURE.md): its memory
//!   is its page cache, set by `journal.store_cache_bytes`, whatever the number of keys;
//!   every commit is atomic; and with quick repair a crashed file opens in about a
//!   millisecond.
//! - **Tables.** `entries` (dedup key → entry JSON), `expiry` ((deadline ms, key) → ()) so
//!   expired entries are found without a scan, and `meta` with the changelog `checkpoint`:
//!   the offset of the next journal record the store has not read.
//! - **The checkpoint commits with the entries it covers**, in one redb transaction, so the
//!   store never claims to have read a record whose entry it lacks. Local writes (entries this
//!   process wrote and Kafka acknowledged) go in ahead of the checkpoint; reading them again
//!   from the changelog merges to the same entry, because entries only grow.
//! - **Durability.** Commits are durable at most a second apart (redb's `Durability::None`
//!   in between). A crash loses at most that second of local writes and checkpoint, and both
//!   are in the changelog past the last durable checkpoint, so the next start reads them
//!   again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

use super::Entry;

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `meta` key: the next changelog offset to read.
const CHECKPOINT: &str = "checkpoint";
/// `meta` key: the layout of this file; another value means rebuild.
const FORMAT: &str = "format";
const FORMAT_VERSION: u64 = 1;
/// Longest time between durable commits.
const DURABLE_EVERY: Duration = Duration::from_secs(1);

/// A store failure. The event waits and tries again; an unreadable file is rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the file: two instances share one `journal.state_dir`.
    #[error("the journal store {0} is open in another process; give each instance its own journal.state_dir")]
    InUse(PathBuf),
    /// Reading or writing the file failed.
    #[error("journal store {path}: {source}")]
    Db {
        /// The store file.
        path: PathBuf,
        /// What redb said.
        source: redb::Error,
    },
}

/// How [`Store::open`] found the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// An existing store; its checkpoint says where the changelog read resumes.
    Existing,
    /// No file: a new, empty store.
    Created,
    /// The file could not be used and was replaced by an empty one (the reason).
    Rebuilt(String),
}

/// The local store of one journal partition.
pub struct Store {
    db: Database,
    path: PathBuf,
    last_durable: Mutex<Instant>,
}

impl Store {
    /// The file of `partition` of `topic` under `dir`.
    pub fn path(dir: &Path, topic: &str, partition: i32) -> PathBuf {
        dir.join(format!("{topic}-{partition}.redb"))
    }

    /// Opens the store at `path`, creating it if missing. A file that cannot be opened, has
    /// another layout, or whose checkpoint is past `log_end` (the changelog's end: the topic
    /// was recreated) is deleted and created again empty, for its changelog to rebuild; one
    /// held by another process is an error.
    pub fn open(
        path: &Path,
        cache_bytes: u64,
        log_end: i64,
    ) -> Result<(Store, Opened), StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| db_err(path, e.into()))?;
        }
        let existed = path.exists();
        let why = match Self::try_open(path, cache_bytes) {
            Ok(store) => match store.checkpoint()? {
                Some(c) if c > log_end => format!(
                    "its checkpoint {c} is past the topic's end {log_end} (the topic was recreated)"
                ),
                _ if existed => return Ok((store, Opened::Existing)),
                _ => return Ok((store, Opened::Created)),
            },
            Err(StoreError::InUse(p)) => return Err(StoreError::InUse(p)),
            Err(e) => e.to_string(),
        };
        // The first store (if any) is closed by now: it was dropped at the end of the match.
        std::fs::remove_file(path).map_err(|e| db_err(path, e.into()))?;
        let store = Self::try_open(path, cache_bytes)?;
        Ok((store, Opened::Rebuilt(why)))
    }

    fn try_open(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        // redb's debug builds assert on some corruptions instead of returning an error.
        let opened = std::panic::catch_unwind(|| {
            Database::builder()
                .set_cache_size(cache_bytes as usize)
                .create(path)
        })
        .map_err(|_| {
            db_err(
                path,
                redb::StorageError::Corrupted("redb panicked opening the file".into()).into(),
            )
        })?;
        let db = match opened {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::InUse(path.to_path_buf()))
            }
            Err(e) => return Err(db_err(path, e.into())),
        };
        let store = Store {
            db,
            path: path.to_path_buf(),
            last_durable: Mutex::new(Instant::now()),
        };
        store.init()?;
        Ok(store)
    }

    /// Creates the tables of a new file; refuses a file of another layout.
    fn init(&self) -> Result<(), StoreError> {
        let w = self.begin(true)?;
        {
            let mut meta = w.open_table(META).map_err(|e| self.err(e.into()))?;
            let format = meta
                .get(FORMAT)
                .map_err(|e| self.err(e.into()))?
                .map(|v| v.value());
            match format {
                None => {
                    meta.insert(FORMAT, FORMAT_VERSION)
                        .map_err(|e| self.err(e.into()))?;
                }
                Some(FORMAT_VERSION) => {}
                Some(other) => {
                    return Err(self.err(
                        redb::StorageError::Corrupted(format!("store format {other}")).into(),
                    ))
                }
            }
            w.open_table(ENTRIES).map_err(|e| self.err(e.into()))?;
            w.open_table(EXPIRY).map_err(|e| self.err(e.into()))?;
        }
        w.commit().map_err(|e| self.err(e.into()))
    }

    fn err(&self, source: redb::Error) -> StoreError {
        db_err(&self.path, source)
    }

    /// A write transaction: durable when `durable` or when the last durable commit is a
    /// second old.
    fn begin(&self, durable: bool) -> Result<redb::WriteTransaction, StoreError> {
        let mut w = self.db.begin_write().map_err(|e| self.err(e.into()))?;
        let mut last = self.last_durable.lock().unwrap_or_else(|e| e.into_inner());
        let durable = durable || last.elapsed() >= DURABLE_EVERY;
        if durable {
            *last = Instant::now();
        }
        w.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(|e| self.err(redb::Error::Corrupted(e.to_string())))?;
        // Saves the allocator state with each commit, so a crashed file opens without a
        // repair that walks every page.
        w.set_quick_repair(true);
        Ok(w)
    }

    /// The next changelog offset to read, if the store has read any.
    pub fn checkpoint(&self) -> Result<Option<i64>, StoreError> {
        let r = self.db.begin_read().map_err(|e| self.err(e.into()))?;
        let meta = r.open_table(META).map_err(|e| self.err(e.into()))?;
        let checkpoint = meta
            .get(CHECKPOINT)
            .map_err(|e| self.err(e.into()))?
            .map(|v| v.value() as i64);
        Ok(checkpoint)
    }

    /// The live entry of `key` at `now_ms`: an entry past its deadline is not returned,
    /// whether or not it has been swept yet.
    pub fn get(&self, key: &str, now_ms: u64) -> Result<Option<Entry>, StoreError> {
        let r = self.db.begin_read().map_err(|e| self.err(e.into()))?;
        let entries = r.open_table(ENTRIES).map_err(|e| self.err(e.into()))?;
        let Some(bytes) = entries.get(key).map_err(|e| self.err(e.into()))? else {
            return Ok(None);
        };
        Ok(decode(key, bytes.value()).filter(|e| e.expires_at_ms > now_ms))
    }

    /// Merges `entry` into the store under `key` (an entry this process wrote and Kafka
    /// acknowledged).
    pub fn record(&self, key: &str, entry: &Entry, now_ms: u64) -> Result<(), StoreError> {
        let w = self.begin(false)?;
        self.merge_in(&w, key, entry, now_ms)?;
        w.commit().map_err(|e| self.err(e.into()))
    }

    /// Applies changelog records (`None` is a tombstone) and moves the checkpoint to
    /// `next_offset`, in one transaction. Returns how many entries changed.
    pub fn apply(
        &self,
        records: &[(String, Option<Entry>)],
        next_offset: i64,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        // The records of one key are merged here first (an event's entries are usually
        // close together in the log), so each key costs the store one read and one write.
        // Per key: whether a tombstone came (the stored entry goes), and what came after it.
        // Sorted by key: redb's B-tree takes ordered inserts with fewer page visits.
        let mut by_key: BTreeMap<&str, (bool, Option<Entry>)> = BTreeMap::new();
        for (key, entry) in records {
            let slot = by_key.entry(key.as_str()).or_default();
            match entry {
                Some(e) if e.expires_at_ms > now_ms => {
                    slot.1 = Some(match slot.1.take() {
                        Some(before) => before.merged(e),
                        None => e.clone(),
                    });
                }
                Some(_) => {}
                None => *slot = (true, None),
            }
        }
        let w = self.begin(false)?;
        let mut changed = 0;
        for (key, (tombstoned, entry)) in by_key {
            if tombstoned {
                changed += usize::from(self.remove_in(&w, key)?);
            }
            if let Some(e) = entry {
                changed += usize::from(self.merge_in(&w, key, &e, now_ms)?);
            }
        }
        {
            let mut meta = w.open_table(META).map_err(|e| self.err(e.into()))?;
            meta.insert(CHECKPOINT, next_offset.max(0) as u64)
                .map_err(|e| self.err(e.into()))?;
        }
        w.commit().map_err(|e| self.err(e.into()))?;
        Ok(changed)
    }

    /// Writes `entry` merged with what the store holds; false when nothing changed.
    fn merge_in(
        &self,
        w: &redb::WriteTransaction,
        key: &str,
        entry: &Entry,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut entries = w.open_table(ENTRIES).map_err(|e| self.err(e.into()))?;
        let current = entries
            .get(key)
            .map_err(|e| self.err(e.into()))?
            .and_then(|v| decode(key, v.value()));
        // An expired entry is not merged with: the key starts over.
        let current = current.filter(|c| c.expires_at_ms > now_ms);
        let merged = match &current {
            Some(c) => c.merged(entry),
            None => entry.clone(),
        };
        if current.as_ref() == Some(&merged) {
            return Ok(false);
        }
        let bytes = serde_json::to_vec(&merged).unwrap_or_default();
        let old = entries
            .insert(key, bytes.as_slice())
            .map_err(|e| self.err(e.into()))?
            .and_then(|v| decode(key, v.value()));
        let mut expiry = w.open_table(EXPIRY).map_err(|e| self.err(e.into()))?;
        if let Some(old) = old {
            if old.expires_at_ms != merged.expires_at_ms {
                expiry
                    .remove((old.expires_at_ms, key))
                    .map_err(|e| self.err(e.into()))?;
            }
        }
        expiry
            .insert((merged.expires_at_ms, key), ())
            .map_err(|e| self.err(e.into()))?;
        Ok(true)
    }

    fn remove_in(&self, w: &redb::WriteTransaction, key: &str) -> Result<bool, StoreError> {
        let mut entries = w.open_table(ENTRIES).map_err(|e| self.err(e.into()))?;
        let Some(old) = entries
            .remove(key)
            .map_err(|e| self.err(e.into()))?
            .map(|v| decode(key, v.value()))
        else {
            return Ok(false);
        };
        if let Some(old) = old {
            let mut expiry = w.open_table(EXPIRY).map_err(|e| self.err(e.into()))?;
            expiry
                .remove((old.expires_at_ms, key))
                .map_err(|e| self.err(e.into()))?;
        }
        Ok(true)
    }

    /// Deletes up to `limit` entries whose deadline is at or before `now_ms`, oldest first;
    /// returns how many.
    pub fn expire(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let w = self.begin(false)?;
        let mut removed = 0;
        {
            let mut expiry = w.open_table(EXPIRY).map_err(|e| self.err(e.into()))?;
            let mut entries = w.open_table(ENTRIES).map_err(|e| self.err(e.into()))?;
            let due: Vec<(u64, String)> = expiry
                .range((0u64, "")..(now_ms.saturating_add(1), ""))
                .map_err(|e| self.err(e.into()))?
                .take(limit)
                .map(|r| r.map(|(k, _)| (k.value().0, k.value().1.to_string())))
                .collect::<Result<_, _>>()
                .map_err(|e| self.err(e.into()))?;
            for (deadline, key) in due {
                expiry
                    .remove((deadline, key.as_str()))
                    .map_err(|e| self.err(e.into()))?;
                // The index row may be stale (an entry that could not be decoded when it was
                // replaced): only an entry past its own deadline goes.
                let live = entries
                    .get(key.as_str())
                    .map_err(|e| self.err(e.into()))?
                    .and_then(|v| decode(&key, v.value()))
                    .is_some_and(|e| e.expires_at_ms > now_ms);
                if !live {
                    entries
                        .remove(key.as_str())
                        .map_err(|e| self.err(e.into()))?;
                    removed += 1;
                }
            }
        }
        w.commit().map_err(|e| self.err(e.into()))?;
        Ok(removed)
    }

    /// Entries held, live or not yet swept.
    pub fn len(&self) -> Result<u64, StoreError> {
        let r = self.db.begin_read().map_err(|e| self.err(e.into()))?;
        let entries = r.open_table(ENTRIES).map_err(|e| self.err(e.into()))?;
        entries.len().map_err(|e| self.err(e.into()))
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Makes every commit so far durable (before closing on revoke or shutdown).
    pub fn sync(&self) -> Result<(), StoreError> {
        let w = self.begin(true)?;
        w.commit().map_err(|e| self.err(e.into()))
    }

    /// The store's file.
    pub fn file(&self) -> &Path {
        &self.path
    }
}

fn db_err(path: &Path, source: redb::Error) -> StoreError {
    StoreError::Db {
        path: path.to_path_buf(),
        source,
    }
}

fn decode(key: &str, bytes: &[u8]) -> Option<Entry> {
    match serde_json::from_slice(bytes) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(%key, error = %e, "unreadable stored journal entry ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(done: bool, expires_at_ms: u64, steps: &[&str]) -> Entry {
        Entry {
            v: 1,
            expires_at_ms,
            done,
            steps: steps
                .iter()
                .map(|s| (s.to_string(), serde_json::json!(s)))
                .collect(),
            intents: Vec::new(),
        }
    }

    const CACHE: u64 = 1 << 20;

    /// More keys than the page cache could hold as values: every one is still found, and the
    /// file stays the only place they live.
    #[test]
    fn every_key_within_its_ttl_is_found_with_far_more_keys_than_the_cache_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = Store::path(dir.path(), "j", 0);
        let (store, how) = Store::open(&path, CACHE, i64::MAX).unwrap();
        assert_eq!(how, Opened::Created);
        // ~200 bytes an entry: 20k entries are about four times the 1 MiB cache.
        let n = 20_000u64;
        let batch: Vec<(String, Option<Entry>)> = (0..n)
            .map(|i| {
                (
                    format!("/webhooks/blog|event-{i:08}"),
                    Some(entry(true, 10_000 + i, &["classify", "notify"])),
                )
            })
            .collect();
        for (i, chunk) in batch.chunks(1000).enumerate() {
            store.apply(chunk, (i as i64 + 1) * 1000, 0).unwrap();
        }
        assert_eq!(store.len().unwrap(), n);
        for i in (0..n).step_by(7) {
            let e = store
                .get(&format!("/webhooks/blog|event-{i:08}"), 0)
                .unwrap();
            assert!(e.is_some_and(|e| e.done), "key {i} forgotten");
        }
        assert_eq!(store.checkpoint().unwrap(), Some(n as i64));
    }

    #[test]
    fn entries_past_their_deadline_are_not_returned_and_are_swept_in_bounded_batches() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&Store::path(dir.path(), "j", 1), CACHE, i64::MAX).unwrap();
        for i in 0..250u64 {
            store
                .record(&format!("k{i}"), &entry(true, 1_000 + i, &["a"]), 0)
                .unwrap();
        }
        // At 1_100 the first 101 deadlines (1_000..=1_100) have passed.
        assert!(store.get("k50", 1_100).unwrap().is_none());
        assert!(store.get("k200", 1_100).unwrap().is_some());
        assert_eq!(store.expire(1_100, 60).unwrap(), 60);
        assert_eq!(store.expire(1_100, 60).unwrap(), 41);
        assert_eq!(store.expire(1_100, 60).unwrap(), 0);
        assert_eq!(store.len().unwrap(), 149);
        // A merge that extends a deadline moves its expiry row: the old one sweeps nothing.
        store
            .record("k200", &entry(true, 5_000, &["b"]), 1_100)
            .unwrap();
        assert_eq!(store.expire(1_300, 1_000).unwrap(), 148);
        let kept = store.get("k200", 1_300).unwrap().expect("extended entry");
        assert_eq!(kept.steps.len(), 2);
        assert_eq!(store.len().unwrap(), 1);
    }

    #[test]
    fn a_record_read_back_from_the_changelog_never_undoes_a_newer_local_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&Store::path(dir.path(), "j", 2), CACHE, i64::MAX).unwrap();
        store
            .record("k", &entry(true, 9_000, &["classify", "notify"]), 0)
            .unwrap();
        let older = entry(false, 9_000, &["classify"]);
        assert_eq!(store.apply(&[("k".into(), Some(older))], 10, 0).unwrap(), 0);
        assert!(store.get("k", 0).unwrap().unwrap().done);
        // A tombstone does remove it.
        assert_eq!(store.apply(&[("k".into(), None)], 11, 0).unwrap(), 1);
        assert!(store.get("k", 0).unwrap().is_none());
        assert_eq!(store.checkpoint().unwrap(), Some(11));
    }

    #[test]
    fn a_reopened_store_keeps_its_entries_and_checkpoint_and_an_unreadable_one_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = Store::path(dir.path(), "j", 3);
        {
            let (store, _) = Store::open(&path, CACHE, i64::MAX).unwrap();
            store
                .apply(&[("k".into(), Some(entry(true, 9_000, &["a"])))], 42, 0)
                .unwrap();
            store.sync().unwrap();
        }
        let (store, how) = Store::open(&path, CACHE, i64::MAX).unwrap();
        assert_eq!(how, Opened::Existing);
        assert_eq!(store.checkpoint().unwrap(), Some(42));
        assert!(store.get("k", 0).unwrap().is_some());
        drop(store);
        // A changelog that ends before the checkpoint (a recreated topic): rebuilt.
        let (store, how) = Store::open(&path, CACHE, 41).unwrap();
        assert!(matches!(how, Opened::Rebuilt(_)), "{how:?}");
        assert_eq!(store.checkpoint().unwrap(), None);
        store
            .apply(&[("k".into(), Some(entry(true, 9_000, &["a"])))], 42, 0)
            .unwrap();
        store.sync().unwrap();
        // A second open of the same file (another process's, or this one's) is refused, not
        // mistaken for corruption.
        assert!(matches!(
            Store::open(&path, CACHE, i64::MAX),
            Err(StoreError::InUse(_))
        ));
        drop(store);
        // Garbage over the header: the file is replaced by an empty store with no checkpoint.
        let mut bytes = std::fs::read(&path).unwrap();
        for b in bytes.iter_mut().take(4096) {
            *b = 0xA5;
        }
        std::fs::write(&path, bytes).unwrap();
        let (store, how) = Store::open(&path, CACHE, i64::MAX).unwrap();
        assert!(matches!(how, Opened::Rebuilt(_)), "{how:?}");
        assert_eq!(store.checkpoint().unwrap(), None);
        assert!(store.is_empty().unwrap());
    }
}

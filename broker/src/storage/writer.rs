//! The single writer: every write of every partition goes through one
//! thread that packs whatever is queued into one redb transaction.
//!
//! redb runs one write transaction at a time and an fsync costs the same
//! for one row as for a thousand, so the writer drains its queue into one
//! transaction and commits it once (group commit across partitions and
//! across log and state machine). The commit is durable
//! ([`redb::Durability::Immediate`]) if any job in it asked for durability;
//! otherwise it is a cheap non-durable commit that the next durable one
//! persists, in order (redb never persists a later commit without the
//! earlier ones, so what a crash loses is always a suffix).
//!
//! The state machine's commits are not durable (the Raft log is), so the
//! writer makes every [`CHECKPOINT_EVERY`]th commit durable: that bounds
//! what a crash makes a node re-apply from its log, and lets redb reuse
//! the pages earlier commits freed (it cannot before a durable commit).
//!
//! A job nobody waits for ([`Commit::Soon`]: a follower applying entries
//! another node proposed, whose clients wait on that node) may be held
//! for up to [`LINGER`] to share a commit with the jobs that follow. A
//! commit costs about the same whatever it holds, and at small windows
//! each apply job holds one or two events, so without this a node paid a
//! commit per entry of every partition it follows. Any other job ends the
//! wait at once and takes the held ones with it.
//!
//! Stored events' bytes are in [`super::event_files`], written by apply
//! jobs outside redb; they are synced before every durable commit, so a
//! durable commit never refers to bytes a crash could lose.
//!
//! Jobs run in the order they were submitted, so openraft's rule that log
//! and vote I/O are serialized holds. If one job fails, the transaction is
//! aborted and each job of the batch is re-run in its own transaction, so
//! one bad job only fails itself.
//!
//! A failed commit (redb's own write or sync, or the event files' sync
//! before it), or a job failing on I/O (an event file write), halts the
//! writer for good ([`super::Halt`]): every later job
//! fails with [`StoreError::Halted`]. What reached the disk is then
//! unknown, and an fsync that failed must not be retried (the kernel may
//! have dropped the dirty pages and would report the retry a success);
//! the node restarts instead and replays from what is really there.

use std::sync::{Arc, Mutex};

use redb::{Database, Durability, WriteTransaction};
use tokio::sync::{mpsc, oneshot};
use tracing::error;

use super::event_files::EventFiles;
use super::{Halt, StoreError};
use crate::metrics::{STORAGE_COMMITS_TOTAL, STORAGE_COMMIT_JOBS, STORAGE_COMMIT_SECONDS};

/// Jobs waiting for the writer. Submitters wait when it is full, which is
/// the back-pressure that keeps memory bounded when the disk is slow.
const QUEUE_CAPACITY: usize = 4096;
/// Most jobs packed into one transaction, so one commit stays bounded.
const MAX_JOBS_PER_TXN: usize = 1024;
/// Every this many commits one is durable even if no job asked.
pub const CHECKPOINT_EVERY: u64 = 128;
/// Longest a [`Commit::Soon`] job waits for company before it commits.
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// When a job's transaction has to commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// At once and durably: the event files are synced and redb commits
    /// with [`Durability::Immediate`] (log purges, snapshot installs).
    Durable,
    /// At once, not durably: someone waits for the job's effect (a
    /// leader's apply answers clients).
    Now,
    /// Not durably, within [`LINGER`]: only the Raft core waits for it,
    /// so it may share a later job's commit.
    Soon,
}

/// Counts commits since the last durable one.
#[derive(Default)]
struct Checkpoints(std::sync::atomic::AtomicU64);

impl Checkpoints {
    /// Whether the next commit must be durable, given what its jobs ask.
    fn durable(&self, asked: bool) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.0.fetch_add(1, Relaxed) + 1;
        if asked || n >= CHECKPOINT_EVERY {
            self.0.store(0, Relaxed);
            true
        } else {
            false
        }
    }
}

type Run = Box<dyn FnMut(&WriteTransaction) -> Result<(), StoreError> + Send>;
type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

struct Job {
    commit: Commit,
    run: Run,
    finish: Finish,
}

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct StorageWriter {
    mode: Mode,
}

#[derive(Clone)]
enum Mode {
    /// Production: a dedicated thread group-commits queued jobs.
    // Field order matters: the sender must drop before the join guard so
    // that the last handle closes the queue and then waits for the thread.
    Thread(mpsc::Sender<Job>, #[allow(dead_code)] Arc<JoinOnDrop>),
    /// Simulation: each job runs at once on the caller's thread in its own
    /// transaction (the simulator may not start threads, DESIGN.md §6);
    /// nothing lingers.
    Inline(Arc<Database>, Arc<EventFiles>, Arc<Checkpoints>, Halt),
    /// Simulation of production: the same group commit, linger and halt
    /// as `Thread`, run by a task on the caller's runtime instead of a
    /// thread, so the simulator exercises the writer production runs.
    Task(mpsc::Sender<Job>),
}

/// How the writer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriterMode {
    /// A dedicated thread with group commit (production).
    Thread,
    /// On the caller's thread, one transaction per job (simulator).
    Inline,
    /// Group commit and linger as in [`WriterMode::Thread`], in a task of
    /// the current tokio runtime (simulator: it may not start threads, and
    /// its paused clock then drives the linger).
    Task,
}

/// Joins the writer thread when the last handle goes, so that once a
/// [`super::Store`] and everything opened from it are dropped the database
/// file is closed and can be reopened at once.
pub(crate) struct JoinOnDrop(Option<std::thread::JoinHandle<()>>);

impl JoinOnDrop {
    pub(crate) fn new(handle: std::thread::JoinHandle<()>) -> JoinOnDrop {
        JoinOnDrop(Some(handle))
    }
}

impl Drop for JoinOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

impl StorageWriter {
    /// Starts the writer thread over `db` and `events`. It stops when
    /// every handle is dropped. A failed commit is reported to `halt`.
    pub fn start(
        db: Arc<Database>,
        events: Arc<EventFiles>,
        halt: Halt,
    ) -> std::io::Result<StorageWriter> {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        // Only to wait on the queue with a deadline (LINGER); the jobs run
        // on the thread itself.
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let handle = std::thread::Builder::new()
            .name("auditflow-writer".into())
            .spawn(move || writer_loop(&db, &events, &halt, &timer, rx))?;
        Ok(StorageWriter {
            mode: Mode::Thread(tx, Arc::new(JoinOnDrop(Some(handle)))),
        })
    }

    /// Starts a task on the current tokio runtime that group-commits
    /// queued jobs as the production thread does (simulator). It stops
    /// when every handle is dropped. A failed commit is reported to
    /// `halt`, as by the thread.
    pub fn task(db: Arc<Database>, events: Arc<EventFiles>, halt: Halt) -> StorageWriter {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(task_loop(db, events, halt, rx));
        StorageWriter {
            mode: Mode::Task(tx),
        }
    }

    /// A writer that runs each job on the caller's thread (simulator).
    pub fn inline(db: Arc<Database>, events: Arc<EventFiles>, halt: Halt) -> StorageWriter {
        StorageWriter {
            mode: Mode::Inline(db, events, Arc::default(), halt),
        }
    }

    /// Queues `work` and returns a future that resolves once its
    /// transaction committed, when and how `commit` says. The job is
    /// queued before this returns, so jobs run in submission order even if
    /// the futures are awaited later or concurrently.
    ///
    /// `work` may run more than once (in a batch that is then aborted, and
    /// again alone), so it must not consume what it captures.
    pub async fn submit<T, F>(
        &self,
        commit: Commit,
        mut work: F,
    ) -> Result<oneshot::Receiver<Result<T, StoreError>>, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let slot: Arc<Mutex<Option<T>>> = Arc::new(Mutex::new(None));
        let (done_tx, done_rx) = oneshot::channel();
        let run_slot = Arc::clone(&slot);
        let job = Job {
            commit,
            run: Box::new(move |txn| {
                let value = work(txn)?;
                *lock(&run_slot) = Some(value);
                Ok(())
            }),
            finish: Box::new(move |result| {
                let result =
                    result.and_then(|()| lock(&slot).take().ok_or(StoreError::WriterStopped));
                let _ = done_tx.send(result);
            }),
        };
        match &self.mode {
            Mode::Thread(tx, _) | Mode::Task(tx) => {
                tx.send(job).await.map_err(|_| StoreError::WriterStopped)?
            }
            Mode::Inline(db, events, checkpoints, halt) => {
                let mut job = job;
                let result = match halt.refusal(HALTED) {
                    Some(refused) => Err(refused),
                    None => {
                        let durable = checkpoints.durable(job.commit == Commit::Durable);
                        run_one(db, events, halt, &mut job, durable)
                    }
                };
                (job.finish)(result);
            }
        }
        Ok(done_rx)
    }

    /// Runs `work` in the writer and waits for its commit.
    pub async fn write<T, F>(&self, commit: Commit, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let done = self.submit(commit, work).await?;
        done.await.map_err(|_| StoreError::WriterStopped)?
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A job that panicked while holding the slot cannot have left a
    // half-written value: the slot is written in one assignment.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits for a job, then adds whatever else is queued to `batch`, up to
/// `max` jobs in all: group commit takes what arrived while the last
/// commit ran, never waiting for more. `false` once the queue is closed
/// and empty.
pub(crate) fn next_batch<J>(rx: &mut mpsc::Receiver<J>, batch: &mut Vec<J>, max: usize) -> bool {
    let Some(first) = rx.blocking_recv() else {
        return false;
    };
    batch.push(first);
    take_queued(rx, batch, max);
    true
}

/// Adds what is queued now to `batch`, up to `max` jobs in all.
pub(crate) fn take_queued<J>(rx: &mut mpsc::Receiver<J>, batch: &mut Vec<J>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

/// [`next_batch`], then, while every job in `batch` is [`Commit::Soon`],
/// waits up to `linger` for more: until a job that may not wait arrives,
/// the batch is full or the queue closes. `false` once the queue is
/// closed and empty.
fn next_lingering_batch(
    timer: &tokio::runtime::Runtime,
    rx: &mut mpsc::Receiver<Job>,
    batch: &mut Vec<Job>,
    linger: std::time::Duration,
) -> bool {
    if !next_batch(rx, batch, MAX_JOBS_PER_TXN) {
        return false;
    }
    timer.block_on(linger_for_more(rx, batch, linger));
    true
}

/// While every job in `batch` is [`Commit::Soon`], waits up to `linger`
/// for more: until a job that may not wait arrives, the batch is full or
/// the queue closes; then takes whatever queued up behind. Shared by the
/// writer thread and the writer task, so both linger alike.
async fn linger_for_more(
    rx: &mut mpsc::Receiver<Job>,
    batch: &mut Vec<Job>,
    linger: std::time::Duration,
) {
    let deadline = tokio::time::Instant::now() + linger;
    let mut may_wait = batch.iter().all(|j| j.commit == Commit::Soon);
    while may_wait && batch.len() < MAX_JOBS_PER_TXN {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(job)) => {
                may_wait = job.commit == Commit::Soon;
                batch.push(job);
            }
            // Closed (commit what is here) or waited long enough.
            Ok(None) | Err(_) => break,
        }
    }
    // Whatever queued up behind the job that ended the wait comes along.
    take_queued(rx, batch, MAX_JOBS_PER_TXN);
}

/// The writer task's loop ([`WriterMode::Task`]): the writer thread's,
/// waiting asynchronously.
async fn task_loop(
    db: Arc<Database>,
    events: Arc<EventFiles>,
    halt: Halt,
    mut rx: mpsc::Receiver<Job>,
) {
    let checkpoints = Checkpoints::default();
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_JOBS_PER_TXN);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        take_queued(&mut rx, &mut batch, MAX_JOBS_PER_TXN);
        linger_for_more(&mut rx, &mut batch, LINGER).await;
        commit_batch(&db, &events, &halt, &checkpoints, &mut batch);
    }
}

/// What a job refused after a halt names.
const HALTED: &str = "storage writes";

fn writer_loop(
    db: &Database,
    events: &EventFiles,
    halt: &Halt,
    timer: &tokio::runtime::Runtime,
    mut rx: mpsc::Receiver<Job>,
) {
    let checkpoints = Checkpoints::default();
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_JOBS_PER_TXN);
    while next_lingering_batch(timer, &mut rx, &mut batch, LINGER) {
        commit_batch(db, events, halt, &checkpoints, &mut batch);
    }
}

/// Commits `batch` in one transaction and completes its jobs (each alone
/// if one of them failed); leaves `batch` empty. Once `halt` is set every
/// job fails with [`StoreError::Halted`]; a failed commit sets it.
fn commit_batch(
    db: &Database,
    events: &EventFiles,
    halt: &Halt,
    checkpoints: &Checkpoints,
    batch: &mut Vec<Job>,
) {
    if let Some(refused) = halt.refusal(HALTED) {
        for job in batch.drain(..) {
            (job.finish)(Err(refused.shared()));
        }
        return;
    }
    let started = std::time::Instant::now();
    let durable = checkpoints.durable(batch.iter().any(|j| j.commit == Commit::Durable));
    let jobs = batch.len();
    match run_batch(db, events, batch, durable) {
        Ok(()) => {
            record_commit(durable, jobs, started.elapsed());
            for job in batch.drain(..) {
                (job.finish)(Ok(()));
            }
        }
        Err(BatchError::Job) => {
            // Re-run one by one so only the failing jobs fail.
            for mut job in batch.drain(..) {
                let durable = job.commit == Commit::Durable;
                let result = match halt.refusal(HALTED) {
                    Some(refused) => Err(refused),
                    None => run_one(db, events, halt, &mut job, durable),
                };
                (job.finish)(result);
            }
        }
        Err(BatchError::Commit(e)) => {
            let e = halted(halt, e);
            for job in batch.drain(..) {
                (job.finish)(Err(e.shared()));
            }
        }
    }
}

/// Group-commit metrics (no-ops unless a recorder is installed, as in the
/// simulator).
fn record_commit(durable: bool, jobs: usize, took: std::time::Duration) {
    let durability = if durable { "immediate" } else { "none" };
    metrics::counter!(STORAGE_COMMITS_TOTAL, "durability" => durability).increment(1);
    metrics::histogram!(STORAGE_COMMIT_JOBS).record(jobs as f64);
    metrics::histogram!(STORAGE_COMMIT_SECONDS).record(took.as_secs_f64());
}

enum BatchError {
    Job,
    Commit(StoreError),
}

/// A write transaction, durable or not. A durable one saves redb's
/// allocator state with it (quick repair): without that, opening the
/// database after a crash walks all of it to rebuild that state, which took
/// 18.6 s for a 2.4 GB database on the development machine (31 s while the
/// other nodes were under load), and that is every restart after a power
/// loss or a kill -9. Only durable commits pay for it (checkpoints, purges,
/// installs: a few a second).
pub(crate) fn begin(db: &Database, durable: bool) -> Result<WriteTransaction, StoreError> {
    let mut txn = db.begin_write()?;
    if durable {
        txn.set_quick_repair(true);
        txn.set_durability(Durability::Immediate)?;
    } else {
        txn.set_durability(Durability::None)?;
    }
    Ok(txn)
}

/// Runs `batch` in one transaction, durable if `durable` (any job asked).
fn run_batch(
    db: &Database,
    events: &EventFiles,
    batch: &mut [Job],
    durable: bool,
) -> Result<(), BatchError> {
    let txn = begin(db, durable).map_err(BatchError::Commit)?;
    for job in batch.iter_mut() {
        if (job.run)(&txn).is_err() {
            let _ = txn.abort();
            return Err(BatchError::Job);
        }
    }
    commit(txn, events, durable).map_err(BatchError::Commit)
}

/// Runs `job` in a transaction of its own, durable if `durable`. A
/// failure to begin or commit halts `halt`, and so does a job that failed
/// on I/O (an event file write on a full or failing disk); a job refused
/// for its content fails alone.
fn run_one(
    db: &Database,
    events: &EventFiles,
    halt: &Halt,
    job: &mut Job,
    durable: bool,
) -> Result<(), StoreError> {
    let txn = begin(db, durable).map_err(|e| halted(halt, e))?;
    if let Err(e) = (job.run)(&txn) {
        let _ = txn.abort();
        if e.io_kind().is_some() {
            return Err(halted(halt, e));
        }
        return Err(e);
    }
    commit(txn, events, durable).map_err(|e| halted(halt, e))
}

/// Halts `halt` because of the failed write `e`, and returns `e`.
fn halted(halt: &Halt, e: StoreError) -> StoreError {
    error!("storage write failed, no more writes: {e}");
    halt.halt(&e);
    e
}

/// Commits `txn`; a durable commit first syncs the event files, whose
/// bytes it may refer to.
fn commit(txn: WriteTransaction, events: &EventFiles, durable: bool) -> Result<(), StoreError> {
    if durable {
        if let Err(e) = events.sync() {
            let _ = txn.abort();
            return Err(e);
        }
    }
    Ok(txn.commit()?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use redb::ReadableTable;

    use super::*;

    fn job(commit: Commit) -> Job {
        Job {
            commit,
            run: Box::new(|_| Ok(())),
            finish: Box::new(|_| {}),
        }
    }

    fn timer() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    fn kinds(batch: &[Job]) -> Vec<Commit> {
        batch.iter().map(|j| j.commit).collect()
    }

    /// A job that may wait is held until one that may not arrives, and
    /// both go in one batch; with a linger this long, a wait that a `Now`
    /// job did not end would hang the test.
    #[test]
    fn a_job_that_may_not_wait_ends_the_linger_and_takes_the_held_ones() {
        let timer = timer();
        let (tx, mut rx) = mpsc::channel(8);
        tx.try_send(job(Commit::Soon)).unwrap();
        let sender = std::thread::spawn(move || {
            tx.blocking_send(job(Commit::Soon)).unwrap();
            tx.blocking_send(job(Commit::Now)).unwrap();
            tx
        });
        let mut batch = Vec::new();
        let long = Duration::from_secs(3600);
        assert!(next_lingering_batch(&timer, &mut rx, &mut batch, long));
        let tx = sender.join().unwrap();
        // Whatever raced in after the `Now` job may come along too.
        assert_eq!(
            kinds(&batch)[..3],
            [Commit::Soon, Commit::Soon, Commit::Now]
        );
        batch.clear();

        tx.try_send(job(Commit::Durable)).unwrap();
        assert!(next_lingering_batch(&timer, &mut rx, &mut batch, long));
        assert_eq!(kinds(&batch), [Commit::Durable]);
    }

    /// Held jobs commit on their own when the linger runs out or the
    /// queue closes, and a closed, empty queue ends the loop.
    #[test]
    fn held_jobs_go_alone_after_the_linger_or_when_the_queue_closes() {
        let timer = timer();
        let (tx, mut rx) = mpsc::channel(8);
        let mut batch = Vec::new();
        tx.try_send(job(Commit::Soon)).unwrap();
        assert!(next_lingering_batch(
            &timer,
            &mut rx,
            &mut batch,
            Duration::ZERO
        ));
        assert_eq!(kinds(&batch), [Commit::Soon]);
        batch.clear();

        tx.try_send(job(Commit::Soon)).unwrap();
        drop(tx);
        assert!(next_lingering_batch(
            &timer,
            &mut rx,
            &mut batch,
            Duration::from_secs(3600)
        ));
        assert_eq!(kinds(&batch), [Commit::Soon]);
        batch.clear();
        assert!(!next_lingering_batch(
            &timer,
            &mut rx,
            &mut batch,
            Duration::ZERO
        ));
    }

    /// Through the writer thread: a lingering write commits (within
    /// LINGER, with nothing after it) and is visible to the next.
    #[tokio::test]
    async fn a_lingering_write_commits_and_later_writes_see_it() {
        const T: redb::TableDefinition<u32, u32> = redb::TableDefinition::new("t");
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("db.redb")).unwrap());
        let events_dir = super::super::FsLogDir::create(&dir.path().join("events"), 1 << 20);
        let events = EventFiles::open(Box::new(events_dir.unwrap()), &Default::default());
        let events = Arc::new(events.unwrap());
        let writer = StorageWriter::start(db, events, Halt::default()).unwrap();
        writer
            .write(Commit::Soon, |txn| {
                Ok(txn.open_table(T)?.insert(1, 10).map(|_| ())?)
            })
            .await
            .unwrap();
        let seen = writer
            .write(Commit::Now, |txn| {
                Ok(txn.open_table(T)?.get(1)?.map(|v| v.value()))
            })
            .await
            .unwrap();
        assert_eq!(seen, Some(10));
    }
}

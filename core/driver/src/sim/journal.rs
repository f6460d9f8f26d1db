//! A simulated server's state file: a snapshot plus a journal of changes appended since, so
//! each change writes one line; compacted into the snapshot as the journal grows.

use super::*;

/// What a simulated server holds: its guests and the next address it hands out.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct SimState {
    pub(super) guests: BTreeMap<String, SimGuest>,
    pub(super) next_ip: u32,
    /// Number of the last change this state holds (journal lines up to it are in it).
    #[serde(default)]
    pub(super) seq: u64,
}

/// One line of a simulated server's journal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Entry {
    /// A guest as it is after change `seq`.
    Put {
        seq: u64,
        guest: Box<SimGuest>,
        next_ip: u32,
    },
    /// A guest destroyed by change `seq`.
    Remove { seq: u64, guest_id: String },
}

/// The journal beside a state file.
pub(super) fn journal_of(path: &std::path::Path) -> PathBuf {
    path.with_extension("journal")
}

/// Writes the whole state to `path`, then empties the journal. The state file comes first (it
/// holds its last change's number): a crash between the two leaves journal lines the state
/// file already holds, which loading skips.
pub(super) fn compact(path: &std::path::Path, state: &SimState) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(state).expect("sim state serializes"),
    )?;
    std::fs::rename(&tmp, path)?;
    std::fs::write(journal_of(path), b"")
}

/// The state kept in `path` and its journal, the journal's lines, and whether its last line was
/// cut short (dropped).
pub(super) fn load(path: &std::path::Path) -> Result<(SimState, usize, bool), DriverError> {
    let unreadable =
        |e: std::io::Error| DriverError::Permanent(format!("cannot read {}: {e}", path.display()));
    let mut state = SimState::default();
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(unreadable)?;
        state = serde_json::from_str(&text).map_err(|e| {
            DriverError::Permanent(format!("corrupt sim state {}: {e}", path.display()))
        })?;
    }
    let journal = journal_of(path);
    let (mut lines, mut cut_short) = (0, false);
    if journal.exists() {
        let text = std::fs::read_to_string(&journal).map_err(unreadable)?;
        let all: Vec<&str> = text.split_terminator('\n').collect();
        for (n, line) in all.iter().enumerate() {
            let entry: Entry = match serde_json::from_str(line) {
                Ok(e) => e,
                Err(_) if n + 1 == all.len() && !text.ends_with('\n') => {
                    cut_short = true;
                    break;
                }
                Err(e) => {
                    return Err(DriverError::Permanent(format!(
                        "corrupt sim journal {} line {}: {e}",
                        journal.display(),
                        n + 1
                    )));
                }
            };
            lines += 1;
            // Changes the state file already holds (a crash between writing it and emptying
            // the journal) are skipped.
            match entry {
                Entry::Put {
                    seq,
                    guest,
                    next_ip,
                } if seq > state.seq => {
                    state.seq = seq;
                    state.next_ip = next_ip;
                    state.guests.insert(guest.info.guest_id.clone(), *guest);
                }
                Entry::Remove { seq, guest_id } if seq > state.seq => {
                    state.seq = seq;
                    state.guests.remove(&guest_id);
                }
                _ => {}
            }
        }
    }
    Ok((state, lines, cut_short))
}

//! tracefs: mounted if needed, and the tracepoints' field offsets checked
//! against what the eBPF programs were compiled with.

use std::path::Path;

use herd_ebpf_common::offsets;

use super::RecordError;

const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs at /sys/kernel/tracing unless it is there already.
///
/// # Errors
/// `Tracefs` with the command to run by hand.
pub fn ensure_tracefs() -> Result<(), RecordError> {
    let events = Path::new(TRACEFS).join("events");
    if events.is_dir() {
        return Ok(());
    }
    nix::mount::mount(
        Some("nodev"),
        TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| RecordError::Tracefs(e.into()))?;
    tracing::info!("mounted tracefs at {TRACEFS}");
    Ok(())
}

/// Finds `field`'s offset in a tracepoint `format` file.
#[must_use]
pub fn field_offset(format: &str, field: &str) -> Option<usize> {
    format.lines().find_map(|l| {
        let decl = l.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        rest.trim()
            .strip_prefix("offset:")?
            .split(';')
            .next()?
            .parse()
            .ok()
    })
}

/// Refuses to record if the running kernel lays out a field differently.
///
/// # Errors
/// `Layout` naming the field, or `Tracefs` if a format file is unreadable.
pub fn check_layout() -> Result<(), RecordError> {
    let checks: [(&str, &str, usize); 8] = [
        ("block/block_rq_issue", "dev", offsets::RQ_DEV),
        ("block/block_rq_issue", "sector", offsets::RQ_SECTOR),
        ("block/block_rq_issue", "nr_sector", offsets::RQ_NR_SECTOR),
        ("block/block_rq_issue", "rwbs", offsets::RQ_RWBS),
        (
            "filemap/mm_filemap_add_to_page_cache",
            "i_ino",
            offsets::PC_INO,
        ),
        (
            "filemap/mm_filemap_add_to_page_cache",
            "index",
            offsets::PC_INDEX,
        ),
        (
            "filemap/mm_filemap_add_to_page_cache",
            "s_dev",
            offsets::PC_SDEV,
        ),
        (
            "filemap/mm_filemap_add_to_page_cache",
            "order",
            offsets::PC_ORDER,
        ),
    ];
    for (tp, field, want) in checks {
        let path = Path::new(TRACEFS).join("events").join(tp).join("format");
        let text = std::fs::read_to_string(&path).map_err(RecordError::Tracefs)?;
        let found = field_offset(&text, field);
        if found != Some(want) {
            return Err(RecordError::Layout {
                tracepoint: if tp.starts_with("block") {
                    "block:block_rq_issue"
                } else {
                    "filemap:mm_filemap_add_to_page_cache"
                },
                field,
                found,
                want,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::field_offset;

    #[test]
    fn reads_offsets_from_a_format_file() {
        let f = "name: block_rq_issue\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
                 \tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;\n\
                 \tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;\n\
                 \tfield:unsigned long i_ino;\toffset:16;\tsize:8;\tsigned:0;\n";
        assert_eq!(field_offset(f, "dev"), Some(8));
        assert_eq!(field_offset(f, "rwbs"), Some(34));
        assert_eq!(field_offset(f, "i_ino"), Some(16));
        assert_eq!(field_offset(f, "sector"), None);
    }
}

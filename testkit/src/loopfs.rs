//! A small ext4 file system of its own, on a loop device, mounted at a temp dir: for runs
//! that must start from the same file-system state (benchmarks) or fill a disk (tests).
//! Needs root. Unmounted and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub struct LoopFs {
    image: PathBuf,
    mount: PathBuf,
}

fn run(cmd: &mut Command) -> std::io::Result<()> {
    let status = cmd.status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("{cmd:?} failed: {status}")))
    }
}

impl LoopFs {
    /// `size_mb` MiB, inode tables and journal initialised now (a lazy init would run in
    /// the background later), mounted under `parent`.
    pub fn new(parent: &Path, name: &str, size_mb: u64) -> std::io::Result<LoopFs> {
        let image = parent.join(format!("{name}.img"));
        let mount = parent.join(name);
        run(Command::new("truncate")
            .arg("-s")
            .arg(format!("{size_mb}M"))
            .arg(&image))?;
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&image))?;
        std::fs::create_dir_all(&mount)?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount))?;
        Ok(LoopFs { image, mount })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // A process that outlives its stop for a moment may still hold the file system.
        for _ in 0..50 {
            let unmounted = Command::new("umount")
                .arg(&self.mount)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if unmounted {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_file(&self.image);
    }
}

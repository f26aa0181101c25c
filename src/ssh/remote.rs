//! Every command rbee runs on a node, built here beside the quoting rules: each path and
//! argument is one quoted shell word (`quote`, `remote_path`), and a file is hashed from stdin,
//! so no file name ever reaches `sha256sum`'s output (GNU escapes a name holding a newline or a
//! backslash, and the digest would no longer be the first 64 characters).

use crate::ssh::quote::{quote, remote_join, remote_path};

/// A line no login shell prints by chance: the command's own output starts after it.
pub(crate) fn marker() -> String {
    format!("rbee-begin-{:016x}", rand::random::<u64>())
}

/// `command` as the node's login shell is given it, whatever that shell is (bash, tcsh, fish):
/// one single-quoted word that only `sh` reads, which prints `marker` on a line of its own and
/// then runs the command. The command travels in base64, as csh-family shells expand `!` and
/// refuse a newline even inside single quotes.
pub(crate) fn under_sh(command: &str, marker: &str) -> String {
    let script = format!("printf '%s\\n' {marker}; {command}");
    let encoded = data_encoding::BASE64.encode(script.as_bytes());
    format!("exec sh -c 'eval \"$(echo {encoded} | base64 -d)\"'")
}

/// What `stdout` holds after the `marker` line, or `None` when the marker never came.
pub(crate) fn after_marker<'a>(stdout: &'a [u8], marker: &str) -> Option<&'a [u8]> {
    let line = format!("{marker}\n");
    let at = stdout
        .windows(line.len())
        .position(|w| w == line.as_bytes())?;
    let start = at == 0 || stdout[at - 1] == b'\n';
    start.then(|| &stdout[at + line.len()..])
}

/// The SHA-256 of the file at `word` (a shell word), or nothing when it cannot be read.
fn sha256_of(word: &str) -> String {
    format!("{{ sha256sum < {word} | cut -c1-64; }} 2>/dev/null")
}

/// The user's home directory, exactly (no newline added).
pub(crate) fn home() -> String {
    "printf %s \"$HOME\"".to_string()
}

/// What the node is, in one command, as `key=value` lines: `home`, `uname` (`uname -sm`),
/// `glibc` (empty on a libc that is not GNU), one `nvidia` line per GPU as `nvidia-smi` lists it
/// (`name, memory.total, memory.free, driver_version, compute_cap`, MiB), `amd` when `/dev/kfd`
/// exists, `current` (where `bin/rbee` points), `current_sha` (the SHA-256 of what it runs),
/// one `installed` line per version under `bin/`, newest first, and `free_kb` for the
/// filesystem that holds (or would hold) `remote_dir`. `with_version` adds `version`: the
/// installed rbee's `version --json` (or `--version` for one without it).
pub(crate) fn node_facts(remote_dir: &str, with_version: bool) -> String {
    let dir = remote_path(remote_dir);
    let bindir = remote_join(remote_dir, "bin");
    let bin = remote_join(remote_dir, "bin/rbee");
    let version = if with_version {
        format!(
            "printf 'version=%s\\n' \"$({bin} version --json 2>/dev/null || {bin} --version 2>/dev/null)\"; "
        )
    } else {
        String::new()
    };
    format!(
        "printf 'home=%s\\n' \"$HOME\"; printf 'uname=%s\\n' \"$(uname -sm)\"; \
         g=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{{print $2}}'); \
         [ -n \"$g\" ] || g=$(ldd --version 2>&1 | head -n 1 | grep -i -e glibc -e 'gnu libc' | awk '{{print $NF}}'); \
         printf 'glibc=%s\\n' \"$g\"; \
         if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi \
         --query-gpu=name,memory.total,memory.free,driver_version,compute_cap \
         --format=csv,noheader,nounits 2>/dev/null | sed 's/^/nvidia=/'; fi; \
         [ -e /dev/kfd ] && echo amd=kfd; \
         printf 'cpu_flags=%s\\n' \"$(awk -F: '/^(flags|Features)[ \\t]*:/ {{print $2; exit}}' /proc/cpuinfo 2>/dev/null)\"; \
         printf 'current=%s\\n' \"$(readlink {bin} 2>/dev/null)\"; \
         printf 'current_sha=%s\\n' \"$({})\"; \
         for v in $(cd {bindir} 2>/dev/null && ls -dt */ 2>/dev/null); do \
         [ -x {bindir}/\"$v\"rbee ] && printf 'installed=%s\\n' \"${{v%/}}\"; done; \
         d={dir}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; \
         printf 'free_kb=%s\\n' \"$(df -Pk \"$d\" | awk 'NR==2 {{print $4}}')\"; {version}true",
        sha256_of(&bin)
    )
}

/// Makes `bin/<sha256>/rbee` the one `bin/rbee` points to when it is there and matches its
/// digest: the link is replaced by a rename, so a hive that starts meanwhile runs one version or
/// the other, never neither. Then keeps the three most recent versions and any a live process
/// runs (`/proc/*/exe`), removing the rest. Prints `active`, or `absent` (nothing changed).
pub(crate) fn activate_binary(remote_dir: &str, sha256: &str) -> String {
    let bindir = remote_join(remote_dir, "bin");
    let versioned = remote_join(remote_dir, &format!("bin/{sha256}/rbee"));
    format!(
        "[ \"$({})\" = {sha} ] || {{ echo absent; exit 0; }}; cd {bindir} || exit 1; \
         ln -sfn {sha}/rbee rbee.next && mv -f rbee.next rbee && touch {sha} && echo active; \
         live=$(for p in /proc/[0-9]*/exe; do readlink \"$p\"; done 2>/dev/null); n=0; \
         for v in $(ls -dt */ 2>/dev/null); do v=${{v%/}}; \
         case $v in *[!0-9a-f]*) continue;; esac; [ ${{#v}} -eq 64 ] || continue; \
         n=$((n+1)); [ $n -le 3 ] && continue; \
         case \"$live\" in *\"/$v/rbee\"*) continue;; esac; rm -rf \"./$v\"; done; true",
        sha256_of(&versioned),
        sha = quote(sha256)
    )
}

/// The check that lands a new version: the file at `tmp` must match `sha256`, then it moves to
/// `bin/<sha256>/rbee`; a partial or wrong file never takes that name.
fn land_binary(remote_dir: &str, tmp: &str, sha256: &str) -> String {
    let versioned = remote_join(remote_dir, &format!("bin/{sha256}/rbee"));
    format!(
        "{{ [ \"$(sha256sum < {tmp} | cut -c1-64)\" = {sha} ] || \
         {{ rm -f {tmp}; echo 'the checksum on the node did not match' >&2; exit 1; }}; }} && \
         chmod 755 {tmp} && mv -f {tmp} {versioned}",
        sha = quote(sha256)
    )
}

/// Reads a binary from stdin into `bin/<sha256>/`, checks it on the node, and names it
/// `bin/<sha256>/rbee`.
pub(crate) fn upload_binary(remote_dir: &str, sha256: &str) -> String {
    let dir = remote_path(remote_dir);
    let vdir = remote_join(remote_dir, &format!("bin/{sha256}"));
    let tmp = remote_join(remote_dir, &format!("bin/{sha256}/rbee.upload"));
    format!(
        "umask 077 && mkdir -p {vdir} && chmod 700 {dir} && cat > {tmp} && {}",
        land_binary(remote_dir, &tmp, sha256)
    )
}

/// Downloads a binary on the node itself (curl, else wget; redirects followed) into
/// `bin/<sha256>/`, checks it, and names it `bin/<sha256>/rbee`. Exits 127 when the node has
/// neither tool.
pub(crate) fn download_binary(remote_dir: &str, sha256: &str, url: &str) -> String {
    let dir = remote_path(remote_dir);
    let vdir = remote_join(remote_dir, &format!("bin/{sha256}"));
    let tmp = remote_join(remote_dir, &format!("bin/{sha256}/rbee.download"));
    let url = quote(url);
    format!(
        "umask 077 && mkdir -p {vdir} && chmod 700 {dir} && \
         if command -v curl >/dev/null 2>&1; then curl -fsSL -o {tmp} {url}; \
         elif command -v wget >/dev/null 2>&1; then wget -q -O {tmp} {url}; \
         else echo 'the node has neither curl nor wget to download rbee' >&2; exit 127; fi && {}",
        land_binary(remote_dir, &tmp, sha256)
    )
}

/// What a push needs to know of the model on the node, one line each: the SHA-256 of the file
/// at `path` (or `missing`), the size of its partial copy (`<path>.part`, 0 when none), the
/// kilobytes free on the filesystem that holds it, and `busy` when another transfer holds the
/// lock beside the partial file (`<path>.part.lock`, flock: pushes and the hive's downloads
/// alike), else `free` (also when the lock cannot be taken for another reason: the upload
/// then says why). Makes the model's directory on the way.
pub(crate) fn model_probe(path: &str) -> String {
    let file = remote_path(path);
    let part = remote_path(&format!("{path}.part"));
    let lock = remote_path(&format!("{path}.part.lock"));
    format!(
        "mkdir -p \"$(dirname {file})\" 2>/dev/null; \
         if [ -f {file} ]; then {}; else echo missing; fi; \
         stat -c %s {part} 2>/dev/null || echo 0; \
         df -Pk \"$(dirname {file})\" 2>/dev/null | awk 'NR==2 {{print $4}}'; \
         if command -v flock >/dev/null 2>&1; then (umask 077; flock -n -E 75 {lock} true) \
         2>/dev/null; [ $? -eq 75 ] && echo busy || echo free; else echo free; fi",
        sha256_of(&file)
    )
}

/// Exit status of `model_upload` when another transfer holds the file's lock.
pub(crate) const MODEL_BUSY: u32 = 75;
/// Exit status of `model_upload` when the complete copy does not match its SHA-256.
pub(crate) const MODEL_MISMATCH: u32 = 3;
/// Exit status of `model_upload` when stdin ended before `size` bytes (the connection broke):
/// the partial file is kept for the next push.
pub(crate) const MODEL_INCOMPLETE: u32 = 74;

/// Writes stdin to the model's partial file (from its start, or appended to what it holds);
/// once it holds `size` bytes, moves it into place when it matches `sha256`, else removes it
/// (exit `MODEL_MISMATCH`); short of `size` it is kept (exit `MODEL_INCOMPLETE`);
/// all under the lock beside the partial file, taken without waiting (exit `MODEL_BUSY`, after
/// reading stdin to its end: a sender that cannot write its data would wait forever), where the
/// node has `flock`.
pub(crate) fn model_upload(path: &str, append: bool, sha256: &str, size: u64) -> String {
    let file = remote_path(path);
    let part = remote_path(&format!("{path}.part"));
    let lock = remote_path(&format!("{path}.part.lock"));
    let op = if append { ">>" } else { ">" };
    format!(
        "mkdir -p \"$(dirname {file})\" && umask 077 && \
         if command -v flock >/dev/null 2>&1; then exec 9>>{lock}; \
         flock -n 9 || {{ cat > /dev/null; echo 'another transfer of this file is under way' >&2; \
         exit {MODEL_BUSY}; }}; fi; \
         cat {op} {part} || exit 1; \
         [ \"$(stat -c %s {part})\" = {size} ] || {{ echo 'the copy is incomplete' >&2; exit {MODEL_INCOMPLETE}; }}; \
         if [ \"$(sha256sum < {part} | cut -c1-64)\" = {sha} ]; then mv -f {part} {file}; \
         else rm -f {part}; echo 'checksum mismatch' >&2; exit {MODEL_MISMATCH}; fi",
        sha = quote(sha256)
    )
}

/// Exit status of `log_tail` when the node has no such log.
pub(crate) const LOG_MISSING: u32 = 66;

/// The last `lines` lines of the log `<remote_dir>/<name>` (the hive's or a worker's), read
/// by the queen itself when the hive does not answer, the newest rotated file's before them
/// (`<name>.1`) when the log was rotated since; exits `LOG_MISSING` when there is none.
pub(crate) fn log_tail(remote_dir: &str, name: &str, lines: usize) -> String {
    let file = remote_join(remote_dir, name);
    let older = remote_join(remote_dir, &format!("{name}.1"));
    format!(
        "if [ -f {file} ]; then {{ cat {older} 2>/dev/null; cat {file}; }} | tail -n {lines}; \
         else exit {LOG_MISSING}; fi"
    )
}

/// The size in bytes of the file at `path`.
pub(crate) fn file_size(path: &str) -> String {
    format!("stat -c %s {}", remote_path(path))
}

/// The contents of `<remote_dir>/<name>`; exits non-zero when there is no such file.
pub(crate) fn read_file(remote_dir: &str, name: &str) -> String {
    format!("cat {}", remote_join(remote_dir, name))
}

/// The SHA-256 of `<remote_dir>/<name>`, empty when it does not exist.
pub(crate) fn file_sha256(remote_dir: &str, name: &str) -> String {
    sha256_of(&remote_join(remote_dir, name))
}

/// Writes stdin to `<remote_dir>/<name>` with mode 0600, atomically.
pub(crate) fn write_private_file(remote_dir: &str, name: &str) -> String {
    let dir = remote_path(remote_dir);
    let path = remote_join(remote_dir, name);
    let tmp = remote_join(remote_dir, &format!("{name}.tmp"));
    format!("mkdir -p {dir} && umask 077 && cat > {tmp} && chmod 600 {tmp} && mv -f {tmp} {path}")
}

/// Enrolls the key on stdin (its file's SHA-256 `sha`, its id `kid`: 16 hex digits) on the
/// node and prints what happened: `enrolled` when the node already has it (as
/// `keys/<kid>.key`, or as the `hive.key` of a node set up before enrollment), `first` when
/// the node had no key and this one is now its first (the `mkdir` of `keys/.first` lets one of
/// two machines win), else `pending`: it waits in `keys/pending/` for a machine with access to
/// approve it. A key the node has is never replaced.
pub(crate) fn enroll_key(remote_dir: &str, kid: &str, sha: &str) -> String {
    let dir = remote_path(remote_dir);
    let legacy = remote_join(remote_dir, "hive.key");
    let first = remote_join(remote_dir, "keys/.first");
    let own = remote_join(remote_dir, &format!("keys/{kid}.key"));
    let pending = remote_join(remote_dir, &format!("keys/pending/{kid}.key"));
    let sha = quote(sha);
    format!(
        "umask 077 && mkdir -p {dir}/keys/pending && chmod 700 {dir} || exit 1; \
         if [ \"$({own_sha})\" = {sha} ] || [ \"$({legacy_sha})\" = {sha} ]; then \
         cat >/dev/null; echo enrolled; \
         elif [ ! -e {legacy} ] && mkdir {first} 2>/dev/null; then \
         cat > {own}.tmp && chmod 600 {own}.tmp && mv -f {own}.tmp {own} && echo first; \
         else cat > {pending}.tmp && chmod 600 {pending}.tmp && mv -f {pending}.tmp {pending} \
         && echo pending; fi",
        own_sha = sha256_of(&own),
        legacy_sha = sha256_of(&legacy),
    )
}

/// Starts the hive detached from the SSH session: only the hive runs in the background, with
/// none of the channel's streams, so the channel closes at once (the hive then leaves the
/// session with setsid itself). Prints the hive's pid and the size of `<remote_dir>/<log_file>`
/// before it started, so that what this start logged can be told from earlier runs' lines.
/// `settings` are the hive's own arguments after `--dir`.
pub(crate) fn start_hive(remote_dir: &str, log_file: &str, settings: &[String]) -> String {
    let bin = remote_join(remote_dir, "bin/rbee");
    let dir = remote_path(remote_dir);
    let log = remote_join(remote_dir, log_file);
    let args: Vec<String> = settings.iter().map(|a| quote(a)).collect();
    format!(
        "cd / || exit 1; o=$({{ wc -c < {log}; }} 2>/dev/null | tr -d ' '); \
         {bin} hive serve --dir {dir} {} </dev/null >/dev/null 2>&1 & echo \"$! ${{o:-0}}\"",
        args.join(" ")
    )
}

/// Prints `exited` and the last error line that `<remote_dir>/<log_file>` gained past byte
/// `offset` (its size when this start began; a log rotated since is read whole) when the hive
/// started as `pid` has exited and no other hive holds the pidfile (one started beside it may
/// have won); prints nothing while it runs. An exited hive may stay a zombie for a while (its
/// parent is whatever reaps orphans on the node), so its state is read, not just its pid
/// signalled. A hive that logged no error may not have run at all: then `binary_status=N` is the
/// exit status of `bin/rbee --version` (132, 128 + SIGILL, for a build the node's CPU cannot
/// run), with no core file left behind.
pub(crate) fn hive_exited(
    remote_dir: &str,
    pid_file: &str,
    log_file: &str,
    pid: u32,
    offset: u64,
) -> String {
    let log = remote_join(remote_dir, log_file);
    let bin = remote_join(remote_dir, "bin/rbee");
    format!(
        "s=$(sed 's/.*) //' /proc/{pid}/stat 2>/dev/null | cut -c1); \
         [ -n \"$s\" ] && [ \"$s\" != Z ] && exit 0; h=$({}); [ -n \"$h\" ] && exit 0; \
         echo exited; o={offset}; n=$({{ wc -c < {log}; }} 2>/dev/null | tr -d ' '); \
         [ \"${{n:-0}}\" -lt $o ] && o=0; \
         e=$(tail -c +$((o + 1)) {log} 2>/dev/null | grep ERROR | tail -n 1); \
         if [ -n \"$e\" ]; then printf '%s\\n' \"$e\"; \
         else (ulimit -c 0; {bin} --version >/dev/null 2>&1); echo \"binary_status=$?\"; fi",
        pidfile_holder(remote_dir, pid_file)
    )
}

/// Relays stdin and stdout to the hive's socket `socket` (an absolute path, `<remote_dir>/hive.sock`)
/// with the rbee installed beside it.
pub(crate) fn bridge(socket: &str) -> String {
    let dir = socket.rsplit_once('/').map_or("", |(dir, _)| dir);
    format!(
        "exec {} hive bridge --socket {}",
        quote(&format!("{dir}/bin/rbee")),
        quote(socket)
    )
}

/// Stops the hive that holds the lock on the pidfile `<remote_dir>/<pid_file>`: SIGTERM, up to
/// `wait` for the lock to be released, then SIGKILL when `kill` (else it prints `stopping` and
/// leaves the hive to finish); prints its pid, or nothing when no process holds the lock (a pid
/// in a stale file is never signalled). The lock is checked with flock(1) on a descriptor
/// opened for reading, which cannot create the file.
pub(crate) fn stop_hive(
    remote_dir: &str,
    pid_file: &str,
    wait: std::time::Duration,
    kill: bool,
) -> String {
    let pidfile = remote_join(remote_dir, pid_file);
    let past = if kill {
        "kill -KILL \"$pid\" 2>/dev/null"
    } else {
        "echo stopping"
    };
    format!(
        "command -v flock >/dev/null 2>&1 || {{ echo 'flock(1) (util-linux) is needed on the node \
         to stop its hive' >&2; exit 2; }}; \
         p={pidfile}; locked() {{ [ -f \"$p\" ] && ! flock -n -s 9 9<\"$p\" 2>/dev/null; }}; \
         locked || exit 0; pid=$(cat \"$p\" 2>/dev/null); [ -n \"$pid\" ] || exit 0; \
         grep -q hive /proc/\"$pid\"/cmdline 2>/dev/null || exit 0; \
         kill -TERM \"$pid\" 2>/dev/null; kill -CONT \"$pid\" 2>/dev/null; echo \"$pid\"; i=0; \
         while locked && [ $i -lt {ticks} ]; do sleep 0.1; i=$((i+1)); done; \
         if locked; then {past}; fi; exit 0",
        ticks = wait.as_millis() / 100
    )
}

/// Prints the pid in the pidfile `<remote_dir>/<pid_file>` when a live hive holds its lock, even
/// one that does not answer; prints nothing for a stale file or none. Where `flock` is missing
/// it falls back to the process itself: alive, and an rbee hive.
pub(crate) fn pidfile_holder(remote_dir: &str, pid_file: &str) -> String {
    let pidfile = remote_join(remote_dir, pid_file);
    format!(
        "f={pidfile}; pid=$(cat \"$f\" 2>/dev/null); [ -n \"$pid\" ] || exit 0; \
         if command -v flock >/dev/null 2>&1; then \
         if flock -n -s 9 9<\"$f\" 2>/dev/null || [ ! -f \"$f\" ]; then exit 0; fi; \
         elif ! kill -0 \"$pid\" 2>/dev/null || ! grep -q hive /proc/\"$pid\"/cmdline 2>/dev/null; then \
         exit 0; fi; echo \"$pid\""
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> std::process::Output {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .output()
            .expect("sh")
    }

    #[test]
    fn a_command_runs_the_same_under_sh_bash_and_tcsh_after_its_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let remote_dir = dir.path().join("a\nb!c 'd'").display().to_string();
        std::fs::create_dir_all(&remote_dir).expect("mkdir");
        std::fs::write(format!("{remote_dir}/f"), b"hello\n").expect("write");
        let marker = marker();
        let command = under_sh(&file_sha256(&remote_dir, "f"), &marker);
        for shell in ["/bin/sh", "/bin/bash", "/usr/bin/tcsh"] {
            if !std::path::Path::new(shell).exists() {
                continue;
            }
            // A login shell that greets first, as a chatty ~/.bashrc does.
            let out = std::process::Command::new(shell)
                .arg("-c")
                .arg(format!("echo hello; {command}"))
                .output()
                .expect("shell");
            let rest = after_marker(&out.stdout, &marker).expect("the marker");
            assert_eq!(
                String::from_utf8_lossy(rest).trim(),
                "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
                "{shell}: {out:?}"
            );
        }
        assert!(after_marker(b"This account is currently not available.\n", &marker).is_none());
        assert!(after_marker(format!("x{marker}\n").as_bytes(), &marker).is_none());
    }

    #[test]
    fn a_file_whose_name_holds_a_newline_and_a_backslash_hashes_to_its_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let remote_dir = dir.path().join("a\nb\\c").display().to_string();
        std::fs::create_dir_all(&remote_dir).expect("mkdir");
        std::fs::write(format!("{remote_dir}/f"), b"hello\n").expect("write");
        let out = sh(&file_sha256(&remote_dir, "f"));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        assert!(sh(&file_sha256(&remote_dir, "none")).stdout.is_empty());
    }

    #[test]
    fn the_pidfile_holder_is_named_only_while_it_holds_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let remote_dir = dir.path().join("a b\nc").display().to_string();
        std::fs::create_dir_all(&remote_dir).expect("mkdir");
        let holder = || {
            let out = sh(&pidfile_holder(&remote_dir, "hive.pid"));
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(holder(), "");
        let path = std::path::Path::new(&remote_dir).join("hive.pid");
        // Held the way a hive holds its pidfile: an exclusive flock on it, the pid inside.
        std::fs::write(&path, format!("{}\n", std::process::id())).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .expect("lock");
        assert_eq!(holder(), std::process::id().to_string());
        drop(lock);
        // A stale file, as a killed hive leaves it: a pid, but no lock.
        std::fs::write(&path, format!("{}\n", std::process::id())).expect("write");
        assert_eq!(holder(), "");
    }

    #[test]
    fn the_stop_signals_only_the_process_that_holds_the_pidfile_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let remote_dir = dir.path().display().to_string();
        let pidfile = dir.path().join("hive.pid");
        // A live process named in a pidfile that nobody holds: stale, never signalled.
        let mut bystander = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        std::fs::write(&pidfile, format!("{}\n", bystander.id())).expect("pidfile");
        let out = sh(&stop_hive(
            &remote_dir,
            "hive.pid",
            std::time::Duration::from_secs(1),
            true,
        ));
        assert!(out.status.success());
        assert!(out.stdout.is_empty(), "{:?}", out.stdout);
        assert!(bystander.try_wait().expect("try_wait").is_none());
        let _ = bystander.kill();
        let _ = bystander.wait();
        // The lock holder (its command line names the pidfile, as a hive's names its dir).
        let mut holder = std::process::Command::new("flock")
            .args(["-x", "-o"])
            .arg(&pidfile)
            .args(["sleep", "30"])
            .spawn()
            .expect("flock");
        let held = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            !sh(&format!("flock -n -s {} true", pidfile.display()))
                .status
                .success()
        });
        assert!(held, "flock never took the lock");
        std::fs::write(&pidfile, format!("{}\n", holder.id())).expect("pidfile");
        let out = sh(&stop_hive(
            &remote_dir,
            "hive.pid",
            std::time::Duration::from_secs(1),
            true,
        ));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            holder.id().to_string()
        );
        assert!(
            holder.wait().expect("wait").code().is_none(),
            "not signalled"
        );
    }

    #[test]
    fn a_model_upload_lands_only_when_its_digest_matches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m\nx\\y/m.gguf").display().to_string();
        let sha = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        let upload = |bytes: &[u8], append: bool, sha: &str| {
            let mut child = std::process::Command::new("sh")
                .arg("-c")
                .arg(model_upload(&path, append, sha, 6))
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("sh");
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(bytes)
                .expect("write");
            child.wait().expect("wait").code()
        };
        let probe = || String::from_utf8_lossy(&sh(&model_probe(&path)).stdout).into_owned();
        let lines = |text: String| -> Vec<String> { text.lines().map(str::to_string).collect() };
        // Cut short: kept, and the probe sees how much there is to resume from.
        assert_eq!(upload(b"hel", false, sha), Some(MODEL_INCOMPLETE as i32));
        let seen = lines(probe());
        assert_eq!(&seen[..2], ["missing", "3"]);
        assert!(seen[2].parse::<u64>().is_ok(), "free kB: {seen:?}");
        assert_eq!(seen[3], "free");
        // Complete but other bytes: removed.
        assert_eq!(upload(b"lo!", true, sha), Some(MODEL_MISMATCH as i32));
        assert_eq!(&lines(probe())[..2], ["missing", "0"]);
        // Resumed to the end and verified: in place.
        assert_eq!(upload(b"hel", false, sha), Some(MODEL_INCOMPLETE as i32));
        assert_eq!(upload(b"lo\n", true, sha), Some(0));
        assert_eq!(&lines(probe())[..2], [sha, "0"]);
        // While another transfer holds the lock, the probe says so and an upload refuses.
        let lock = format!("{path}.part.lock");
        let _holder = nix::fcntl::Flock::lock(
            std::fs::File::create(&lock).expect("lock file"),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .map_err(|(_, e)| e)
        .expect("lock");
        assert_eq!(lines(probe())[3], "busy");
        assert_eq!(upload(b"hello\n", false, sha), Some(MODEL_BUSY as i32));
    }
    #[test]
    fn activation_keeps_three_recent_versions_and_any_a_live_process_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let remote_dir = dir.path().join("r 'd'").display().to_string();
        let bin = std::path::Path::new(&remote_dir).join("bin");
        // Five versions installed one after the other; the first is a copy of sleep(1), run
        // from its versioned path the way a hive runs from its own.
        let sleep = std::fs::read("/bin/sleep").expect("sleep");
        let mut shas = Vec::new();
        let mut live = None;
        assert_eq!(
            sh(&activate_binary(&remote_dir, &"0".repeat(64))).stdout,
            b"absent\n"
        );
        for i in 0..5u8 {
            let mut bytes = sleep.clone();
            bytes.push(i);
            let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            let path = bin.join(&sha).join("rbee");
            std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
            std::fs::write(&path, &bytes).expect("write");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .expect("chmod");
            assert_eq!(sh(&activate_binary(&remote_dir, &sha)).stdout, b"active\n");
            if i == 0 {
                live = Some(
                    std::process::Command::new(&path)
                        .arg("30")
                        .spawn()
                        .expect("run version 0"),
                );
            }
            shas.push(sha);
            // Whole seconds apart on any filesystem's clock.
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        assert_eq!(
            std::fs::read_link(bin.join("rbee")).expect("link"),
            std::path::PathBuf::from(format!("{}/rbee", shas[4]))
        );
        let kept: Vec<bool> = shas.iter().map(|s| bin.join(s).exists()).collect();
        // 4, 3 and 2 are the most recent; 0 runs; 1 goes.
        assert_eq!(kept, [true, false, true, true, true]);
        if let Some(mut live) = live {
            let _ = live.kill();
            let _ = live.wait();
        }
    }
}

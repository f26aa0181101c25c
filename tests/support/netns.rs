//! A test host in a network namespace of the test's own, joined to this machine by a veth
//! pair, so a test can cut the network between queen and node.

use std::process::Command;

pub(crate) struct Netns {
    pub(crate) name: String,
    pub(crate) host_ip: String,
    pub(crate) node_ip: String,
    veth: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    /// Root only; `None` (with a note) elsewhere.
    pub(crate) fn create(tag: u8) -> Option<Netns> {
        if !nix::unistd::geteuid().is_root() || Command::new("ip").arg("-V").output().is_err() {
            eprintln!("skipped: network namespaces need root and iproute2");
            return None;
        }
        let id = std::process::id() % 200 + u32::from(tag);
        let name = format!("rbee-t{id}");
        let veth = format!("rbv{id}");
        let subnet = format!("10.213.{}", id % 250);
        let ns = Netns {
            host_ip: format!("{subnet}.1"),
            node_ip: format!("{subnet}.2"),
            name,
            veth,
        };
        let peer = format!("{}p", ns.veth);
        let ok = ip(&["netns", "add", &ns.name])
            && ip(&[
                "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
            ])
            && ip(&["link", "set", &peer, "netns", &ns.name])
            && ip(&[
                "addr",
                "add",
                &format!("{}/24", ns.host_ip),
                "dev",
                &ns.veth,
            ])
            && ip(&["link", "set", &ns.veth, "up"])
            && ip(&[
                "netns",
                "exec",
                &ns.name,
                "ip",
                "addr",
                "add",
                &format!("{}/24", ns.node_ip),
                "dev",
                &peer,
            ])
            && ip(&["netns", "exec", &ns.name, "ip", "link", "set", &peer, "up"])
            && ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"]);
        assert!(ok, "cannot set up network namespace {}", ns.name);
        Some(ns)
    }

    /// Cuts (`false`) or restores (`true`) the link.
    pub(crate) fn link(&self, up: bool) {
        assert!(ip(&[
            "link",
            "set",
            &self.veth,
            if up { "up" } else { "down" }
        ]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // What still runs in the namespace goes with it: an sshd session whose client was
        // behind a cut link waits for that client forever (no keepalive), holding the
        // namespace after it is deleted.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

//! vexec-agent: the guest's init. vexec puts it in the initramfs it boots
//! as `/init`; it runs only as PID 1 inside a vexec VM.

fn main() {
    if std::process::id() != 1 {
        // It mounts, loads modules and powers off: never on the host.
        eprintln!(
            "vexec-agent: error: this is vexec's in-guest init and runs only as PID 1 inside a vexec VM; run `vexec` instead"
        );
        std::process::exit(125);
    }
    vexec_agent::run();
}

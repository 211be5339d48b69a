//! Loading the modules the initramfs carries, each as soon as its
//! dependencies are in, several at a time.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use vexec_protocol::layout::{MODULE_DIR, MODULE_LIST, parse_module_list};

use super::sys;

/// Module name → how loading it went, once attempted.
type Outcomes = HashMap<String, Result<(), String>>;

/// Loads every module in the initramfs list. Modules already present
/// (EEXIST) count as loaded.
pub fn load_all(root: &Path) -> Result<usize, String> {
    let list = match std::fs::read_to_string(root.join(MODULE_LIST)) {
        Ok(t) => parse_module_list(&t),
        Err(_) => return Ok(0),
    };
    if list.is_empty() {
        return Ok(0);
    }
    // name -> Some(result) once attempted.
    let state: Arc<(Mutex<Outcomes>, Condvar)> =
        Arc::new((Mutex::new(HashMap::new()), Condvar::new()));
    let names: Vec<String> = list.iter().map(|(n, _)| n.clone()).collect();
    std::thread::scope(|s| {
        for (name, deps) in &list {
            // Only wait for dependencies that are in the list; the rest are built in.
            let deps: Vec<&String> = deps.iter().filter(|d| names.contains(d)).collect();
            let state = Arc::clone(&state);
            s.spawn(move || {
                let (lock, cv) = &*state;
                let mut done = lock.lock().unwrap();
                loop {
                    if let Some(failed) = deps
                        .iter()
                        .find(|d| matches!(done.get(d.as_str()), Some(Err(_))))
                    {
                        let msg = format!("dependency {failed} failed");
                        done.insert(name.clone(), Err(msg));
                        cv.notify_all();
                        return;
                    }
                    if deps.iter().all(|d| done.contains_key(d.as_str())) {
                        break;
                    }
                    done = cv.wait(done).unwrap();
                }
                drop(done);
                let path = root.join(MODULE_DIR).join(format!("{name}.ko"));
                let result = std::fs::File::open(&path)
                    .and_then(|f| sys::finit_module(&f, ""))
                    .or_else(|e| {
                        if e.raw_os_error() == Some(libc::EEXIST) {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| format!("{e}"));
                super::step(&format!("module {name} loaded"));
                lock.lock().unwrap().insert(name.clone(), result);
                cv.notify_all();
            });
        }
    });
    let done = state.0.lock().unwrap();
    let mut errors: Vec<String> = list
        .iter()
        .filter_map(|(n, _)| match done.get(n) {
            Some(Err(e)) => Some(format!("{n}: {e}")),
            _ => None,
        })
        .collect();
    if errors.is_empty() {
        Ok(list.len())
    } else {
        errors.sort();
        Err(format!("loading modules failed: {}", errors.join("; ")))
    }
}

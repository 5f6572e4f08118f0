//! The C ABI (`runtime/include/egret_runtime.h`): open an artifact with weights, run
//! prefill/decode or a whole generation, free. Every function reports failure by its return
//! value and leaves the message for `egret_last_error` (per thread); none unwinds into C.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::generate::{generate, GenerateOptions, LanguageModel};
use crate::sampler::SamplerConfig;
use crate::{Artifact, Session};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning an error or a panic into `fail` and a last-error message.
fn guard<T>(fail: T, f: impl FnOnce() -> Result<T, String>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(m)) => {
            set_error(m);
            fail
        }
        Err(_) => {
            set_error("internal error (panic) in egret-runtime".into());
            fail
        }
    }
}

unsafe fn path<'a>(p: *const c_char, what: &str) -> Result<&'a str, String> {
    if p.is_null() {
        return Err(format!("{what} is NULL"));
    }
    // SAFETY: the caller passes a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| format!("{what} is not UTF-8"))
}

unsafe fn slice<'a, T>(p: *const T, n: usize, what: &str) -> Result<&'a [T], String> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(format!("{what} is NULL"));
    }
    // SAFETY: the caller passes `n` readable elements.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// The message of the last failed call on this thread (empty if none); valid until the next
/// call on this thread.
#[no_mangle]
pub extern "C" fn egret_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Opens `artifact_dir` and binds the weights at `weights_path`; NULL on failure.
///
/// # Safety
/// Both arguments are NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn egret_session_open(
    artifact_dir: *const c_char,
    weights_path: *const c_char,
    threads: usize,
) -> *mut Session {
    guard(std::ptr::null_mut(), || {
        let dir = unsafe { path(artifact_dir, "artifact_dir") }?;
        let wp = unsafe { path(weights_path, "weights_path") }?;
        let art = Artifact::load(dir).map_err(|e| e.to_string())?;
        let w = crate::weights::load(wp.as_ref()).map_err(|e| e.to_string())?;
        let s = Session::new(&art, w, threads).map_err(|e| e.to_string())?;
        Ok(Box::into_raw(Box::new(s)))
    })
}

/// Frees a session (NULL is ignored).
///
/// # Safety
/// `s` came from `egret_session_open` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn egret_session_free(s: *mut Session) {
    if !s.is_null() {
        // SAFETY: per the contract, `s` is a live session from Box::into_raw.
        drop(unsafe { Box::from_raw(s) });
    }
}

/// The vocabulary size (the length of every logits row); 0 for NULL.
///
/// # Safety
/// `s` is a live session or NULL.
#[no_mangle]
pub unsafe extern "C" fn egret_vocab_size(s: *const Session) -> usize {
    // SAFETY: per the contract.
    unsafe { s.as_ref() }.map_or(0, |s| s.vocab_size())
}

unsafe fn logits_step(
    s: *mut Session,
    logits_out: *mut f32,
    f: impl FnOnce(&mut Session) -> crate::Result<Vec<f32>>,
) -> i32 {
    guard(-1, || {
        // SAFETY: per the callers' contract.
        let s = unsafe { s.as_mut() }.ok_or("session is NULL")?;
        let row = f(s).map_err(|e| e.to_string())?;
        if logits_out.is_null() {
            return Err("logits_out is NULL".into());
        }
        // SAFETY: the caller provides vocab_size floats.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), logits_out, row.len()) };
        Ok(0)
    })
}

/// Empties the cache, runs `ids` and writes the logits after the last one (vocab floats).
/// Returns 0, or -1 on failure.
///
/// # Safety
/// `s` is a live session; `ids` has `n` elements; `logits_out` has room for the vocabulary.
#[no_mangle]
pub unsafe extern "C" fn egret_prefill(
    s: *mut Session,
    ids: *const u32,
    n: usize,
    logits_out: *mut f32,
) -> i32 {
    match unsafe { slice(ids, n, "ids") } {
        Ok(ids) => unsafe { logits_step(s, logits_out, |s| s.prefill(ids)) },
        Err(m) => {
            set_error(m);
            -1
        }
    }
}

/// Appends `id` to the cache and writes the logits after it. Returns 0, or -1 on failure.
///
/// # Safety
/// As `egret_prefill`.
#[no_mangle]
pub unsafe extern "C" fn egret_decode(s: *mut Session, id: u32, logits_out: *mut f32) -> i32 {
    unsafe { logits_step(s, logits_out, |s| s.decode(id)) }
}

/// Generates up to `max_new` tokens after the prompt (temperature 0: greedy), stopping after
/// any of `stop_ids`; writes them to `out` and returns how many, or -1 on failure.
///
/// # Safety
/// `s` is a live session; `prompt` has `n_prompt` elements, `stop_ids` `n_stop`, and `out`
/// room for `max_new`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn egret_generate(
    s: *mut Session,
    prompt: *const u32,
    n_prompt: usize,
    max_new: usize,
    temperature: f32,
    top_p: f32,
    seed: u64,
    stop_ids: *const u32,
    n_stop: usize,
    out: *mut u32,
) -> i64 {
    guard(-1, || {
        // SAFETY: per the contract.
        let s = unsafe { s.as_mut() }.ok_or("session is NULL")?;
        let prompt = unsafe { slice(prompt, n_prompt, "prompt") }?;
        let stop = unsafe { slice(stop_ids, n_stop, "stop_ids") }?;
        if out.is_null() && max_new > 0 {
            return Err("out is NULL".into());
        }
        let opts = GenerateOptions {
            max_new_tokens: max_new,
            sampler: SamplerConfig {
                temperature,
                top_p,
                seed,
            },
            stop_ids: stop.to_vec(),
        };
        let g = generate(s, prompt, &opts, |_| {}).map_err(|e| e.to_string())?;
        // SAFETY: `out` has room for max_new ≥ g.ids.len() ids.
        unsafe { std::ptr::copy_nonoverlapping(g.ids.as_ptr(), out, g.ids.len()) };
        Ok(g.ids.len() as i64)
    })
}

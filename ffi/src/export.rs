//! Module entry points: what [`crate::dovecot_plugin!`] exports to Dovecot, and the
//! generic trampolines the C shim calls back into.
//!
//! The plugin value lives in one global slot (a module is loaded once per process);
//! every trampoline takes it out of the slot through the panic guard.

use std::any::Any;
use std::ffi::{c_char, c_void};
use std::sync::Mutex;

use crate::bindings as sys;
use crate::guard;
use crate::host::{Change, Commit, Mailbox, SavedMail, User};
use crate::Plugin;

/// The exported `<name>_plugin_version` / `_dependencies` values: Dovecot reads them
/// with `dlsym` and dereferences them as `const char *` / `const char *[]`.
#[repr(transparent)]
pub struct ModuleInfo<T>(pub T);
// SAFETY: the wrapped pointers point to immutable 'static C strings.
unsafe impl<T> Sync for ModuleInfo<T> {}

impl ModuleInfo<*const c_char> {
    pub const fn text(bytes_with_nul: &'static [u8]) -> Self {
        ModuleInfo(bytes_with_nul.as_ptr() as *const c_char)
    }
}

static PLUGIN: Mutex<Option<Box<dyn Any + Send>>> = Mutex::new(None);

fn with_plugin<P: Plugin, T>(f: impl FnOnce(&mut P) -> T) -> Option<T> {
    let mut slot = PLUGIN.lock().unwrap_or_else(|e| e.into_inner());
    slot.as_mut()?.downcast_mut::<P>().map(f)
}

/// `<name>_plugin_init`: create the plugin and register the notify hooks.
///
/// # Safety
/// Called by Dovecot's module loader with its module pointer, on Dovecot's thread.
pub unsafe fn init<P: Plugin>(module: *mut c_void) {
    guard::install_panic_hook();
    guard::run("plugin init", (), || {
        let plugin = P::init();
        *PLUGIN.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(plugin));
        let callbacks = sys::dovepush_callbacks {
            delivery_begin: Some(delivery_begin::<P>),
            mail_saved: Some(mail_saved::<P>),
            delivery_commit: Some(delivery_commit::<P>),
            delivery_rollback: Some(delivery_rollback::<P>),
            change_begin: Some(change_begin::<P>),
            change_commit: Some(change_commit::<P>),
            change_rollback: Some(change_rollback::<P>),
        };
        // SAFETY: the shim copies the callbacks; module is Dovecot's.
        unsafe { sys::dovepush_shim_register(module.cast(), &callbacks) };
    })
}

/// `<name>_plugin_deinit`: unregister the hooks and hand the plugin its `deinit`.
///
/// # Safety
/// Called by Dovecot's module loader on Dovecot's thread, before `dlclose`.
pub unsafe fn deinit<P: Plugin>() {
    guard::run("plugin deinit", (), || {
        // SAFETY: unregistering is safe at any time on Dovecot's thread.
        unsafe { sys::dovepush_shim_unregister() };
        let plugin = PLUGIN.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(plugin) = plugin.and_then(|p| p.downcast::<P>().ok()) {
            plugin.deinit();
        }
    })
}

unsafe extern "C" fn delivery_begin<P: Plugin>(
    user: *mut sys::mail_user,
    mailbox: *mut sys::mailbox,
) -> *mut c_void {
    guard::run("delivery begin", std::ptr::null_mut(), || {
        // SAFETY: the shim passes the live user and mailbox of this transaction.
        let (user, mailbox) = unsafe { (User::from_raw(user), Mailbox::from_raw(mailbox)) };
        with_plugin::<P, _>(|p| p.delivery_begin(&user, &mailbox))
            .flatten()
            .map(|state| Box::into_raw(Box::new(state)).cast::<c_void>())
            .unwrap_or(std::ptr::null_mut())
    })
}

unsafe extern "C" fn mail_saved<P: Plugin>(
    state: *mut c_void,
    mail: *const sys::dovepush_saved_mail,
) {
    guard::run("mail saved", (), || {
        // SAFETY: `state` came from `delivery_begin::<P>` and is still owned by the shim.
        let delivery = unsafe { &mut *state.cast::<P::Delivery>() };
        // SAFETY: the shim passes a valid struct for this call.
        let mail = unsafe { SavedMail::from_raw(mail) };
        with_plugin::<P, _>(|p| p.mail_saved(delivery, &mail));
    })
}

unsafe extern "C" fn delivery_commit<P: Plugin>(
    state: *mut c_void,
    user: *mut sys::mail_user,
    mailbox: *mut sys::mailbox,
    commit: *const sys::dovepush_commit,
) {
    // SAFETY: `state` came from `delivery_begin::<P>`; the shim hands it over exactly once.
    let delivery = unsafe { Box::from_raw(state.cast::<P::Delivery>()) };
    guard::run("delivery commit", (), move || {
        // SAFETY: user and mailbox are live or NULL (a delivery whose UIDs could not
        // be resolved at process exit); the commit struct is valid for this call.
        let (user, mailbox, commit) = unsafe {
            (
                (!user.is_null()).then(|| User::from_raw(user)),
                (!mailbox.is_null()).then(|| Mailbox::from_raw(mailbox)),
                Commit::from_raw(commit),
            )
        };
        with_plugin::<P, _>(|p| {
            p.delivery_commit(*delivery, user.as_ref(), mailbox.as_ref(), &commit)
        });
    })
}

unsafe extern "C" fn delivery_rollback<P: Plugin>(state: *mut c_void) {
    // SAFETY: as in delivery_commit.
    let delivery = unsafe { Box::from_raw(state.cast::<P::Delivery>()) };
    guard::run("delivery rollback", (), move || {
        with_plugin::<P, _>(|p| p.delivery_rollback(*delivery));
    })
}

unsafe extern "C" fn change_begin<P: Plugin>(
    user: *mut sys::mail_user,
    mailbox: *mut sys::mailbox,
) -> *mut c_void {
    guard::run("change begin", std::ptr::null_mut(), || {
        // SAFETY: the shim passes the live user and mailbox of this transaction.
        let (user, mailbox) = unsafe { (User::from_raw(user), Mailbox::from_raw(mailbox)) };
        with_plugin::<P, _>(|p| p.change_begin(&user, &mailbox))
            .flatten()
            .map(|state| Box::into_raw(Box::new(state)).cast::<c_void>())
            .unwrap_or(std::ptr::null_mut())
    })
}

unsafe extern "C" fn change_commit<P: Plugin>(
    state: *mut c_void,
    user: *mut sys::mail_user,
    mailbox: *mut sys::mailbox,
    facts: *const sys::dovepush_change,
) {
    // SAFETY: `state` came from `change_begin::<P>`; the shim hands it over exactly once.
    let change = unsafe { Box::from_raw(state.cast::<P::Change>()) };
    guard::run("change commit", (), move || {
        // SAFETY: the shim passes the live user and mailbox of the committed
        // transaction and a facts struct valid for this call.
        let (user, mailbox, facts) = unsafe {
            (
                User::from_raw(user),
                Mailbox::from_raw(mailbox),
                Change::from_raw(facts),
            )
        };
        with_plugin::<P, _>(|p| p.change_commit(*change, &user, &mailbox, &facts));
    })
}

unsafe extern "C" fn change_rollback<P: Plugin>(state: *mut c_void) {
    // SAFETY: as in change_commit.
    let change = unsafe { Box::from_raw(state.cast::<P::Change>()) };
    guard::run("change rollback", (), move || {
        with_plugin::<P, _>(|p| p.change_rollback(*change));
    })
}

/// Export a [`Plugin`] as a Dovecot mail module.
///
/// `dovecot_plugin!(dovepush, MyPlugin, ["notify"]);` defines `dovepush_plugin_version`,
/// `dovepush_plugin_dependencies`, `dovepush_plugin_init` and `dovepush_plugin_deinit`,
/// for a file installed as `libNN_dovepush_plugin.so` (NN sorting after notify's 15).
#[macro_export]
macro_rules! dovecot_plugin {
    ($plugin:ty, version: $version:ident, dependencies: $deps:ident, init: $init:ident, deinit: $deinit:ident, requires: [$($dep:literal),*]) => {
        #[allow(non_upper_case_globals, unsafe_code)]
        #[no_mangle]
        pub static $version: $crate::__private::ModuleInfo<*const ::std::ffi::c_char> =
            $crate::__private::ModuleInfo::text($crate::__private::ABI_VERSION_WITH_NUL);

        #[allow(non_upper_case_globals, unsafe_code)]
        #[no_mangle]
        pub static $deps: $crate::__private::ModuleInfo<[*const ::std::ffi::c_char; [$($dep),*].len() + 1]> =
            $crate::__private::ModuleInfo([
                $(::std::concat!($dep, "\0").as_ptr() as *const ::std::ffi::c_char,)*
                ::std::ptr::null(),
            ]);

        #[allow(unsafe_code)]
        #[no_mangle]
        pub unsafe extern "C" fn $init(module: *mut ::std::ffi::c_void) {
            // SAFETY: called by Dovecot's module loader on its thread.
            unsafe { $crate::__private::init::<$plugin>(module) }
        }

        #[allow(unsafe_code)]
        #[no_mangle]
        pub unsafe extern "C" fn $deinit() {
            // SAFETY: called by Dovecot's module loader on its thread.
            unsafe { $crate::__private::deinit::<$plugin>() }
        }
    };
}

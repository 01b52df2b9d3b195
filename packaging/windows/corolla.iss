; Inno Setup 6 script: Corolla for Windows.
;
; The window (PySide6) runs natively. The node and the block server need hivemind, which has no
; Windows build, so they run in a WSL2 distro named "Corolla" (a Debian root filesystem holding the
; Linux bundle, made by packaging/wsl/build-rootfs.sh); the window starts the node there with
;   wsl.exe --distribution Corolla --exec corolla node
; and talks to it over localhost, exactly as on Linux and macOS. GPU work uses CUDA in WSL.
;
; Build (packaging/windows/build-windows.sh does all of it):
;   iscc /DAppVersion=0.1.0 /DWindowDir=..\..\build\dist\Corolla /DRootfs=..\..\build\packages\corolla-wsl-rootfs.tar.gz packaging\windows\corolla.iss
; Output: build\packages\Corolla-Setup-<version>.exe

#ifndef AppVersion
  #define AppVersion "0.0.0"
#endif
#ifndef WindowDir
  #define WindowDir "..\..\build\dist\Corolla"
#endif
#ifndef Rootfs
  #define Rootfs "..\..\build\packages\corolla-wsl-rootfs.tar.gz"
#endif
#define Distro "Corolla"

[Setup]
AppId={{5C3E9A52-7D1B-4F0E-9B8A-C0A0110A0001}
AppName=Corolla
AppVersion={#AppVersion}
AppPublisher=Corolla developers
DefaultDirName={autopf}\Corolla
DefaultGroupName=Corolla
; Per-user install (WSL distros are per-user too); enabling WSL itself asks for elevation separately.
PrivilegesRequired=lowest
PrivilegesRequiredOverridesAllowed=dialog
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
MinVersion=10.0.19041
OutputDir=..\..\build\packages
OutputBaseFilename=Corolla-Setup-{#AppVersion}
SetupIconFile=..\..\resources\icons\corolla.ico
UninstallDisplayIcon={app}\Corolla.exe
Compression=lzma2/max
SolidCompression=yes
WizardStyle=modern
LicenseFile=..\..\LICENSE

[Tasks]
Name: "desktopicon"; Description: "Create a &desktop shortcut"; Flags: unchecked
Name: "autostart"; Description: "Start Corolla when I sign in (it lives in the tray)"

[Files]
Source: "{#WindowDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs
Source: "{#Rootfs}"; DestDir: "{app}\wsl"; DestName: "corolla-wsl-rootfs.tar.gz"; Flags: ignoreversion

[Icons]
Name: "{group}\Corolla"; Filename: "{app}\Corolla.exe"; Parameters: "app"
Name: "{group}\Uninstall Corolla"; Filename: "{uninstallexe}"
Name: "{autodesktop}\Corolla"; Filename: "{app}\Corolla.exe"; Parameters: "app"; Tasks: desktopicon

[Registry]
; The same Run value the window's own "Start at login" setting writes (corolla/gui/autostart.py).
Root: HKCU; Subkey: "Software\Microsoft\Windows\CurrentVersion\Run"; ValueType: string; ValueName: "Corolla"; ValueData: """{app}\Corolla.exe"" app"; Flags: uninsdeletevalue; Tasks: autostart

[Run]
Filename: "{app}\Corolla.exe"; Parameters: "app"; Description: "Start Corolla now"; Flags: nowait postinstall skipifsilent; Check: WslReady

[UninstallRun]
; Stop the node and its block server before files go away (the distro itself: see [Code]).
Filename: "{sys}\wsl.exe"; Parameters: "--terminate {#Distro}"; Flags: runhidden; RunOnceId: "TerminateDistro"

[Code]
var
  WslNeedsReboot: Boolean;

function RunHidden(const FileName, Params: String): Integer;
var
  Code: Integer;
begin
  if not Exec(FileName, Params, '', SW_HIDE, ewWaitUntilTerminated, Code) then
    Code := -1;
  Result := Code;
end;

function WslPath: String;
begin
  Result := ExpandConstant('{sys}\wsl.exe');
end;

{ WSL2 is usable when `wsl.exe --status` succeeds. }
function WslReady: Boolean;
begin
  Result := FileExists(WslPath) and (RunHidden(WslPath, '--status') = 0) and not WslNeedsReboot;
end;

function DistroExists: Boolean;
begin
  Result := RunHidden(WslPath, '--distribution {#Distro} --exec true') = 0;
end;

{ Enable WSL2 (an elevated `wsl.exe --install --no-distribution`); Windows restarts afterwards. }
procedure EnableWsl;
var
  Code: Integer;
begin
  if SuppressibleMsgBox('Corolla runs its swarm node in WSL2, which is not enabled on this computer.' + #13#10 +
            'Enable it now? Windows asks for permission and needs a restart afterwards.',
            mbConfirmation, MB_YESNO, IDNO) <> IDYES then
    Exit;
  if ShellExec('runas', WslPath, '--install --no-distribution', '', SW_SHOW, ewWaitUntilTerminated, Code) and (Code = 0) then
    WslNeedsReboot := True
  else
    SuppressibleMsgBox('WSL2 could not be enabled (code ' + IntToStr(Code) + '). Corolla can still chat through ' +
           'a remote node; run "wsl --install" yourself to contribute from this computer.', mbError, MB_OK, IDOK);
end;

{ Import the Corolla distro, or update the bundle inside an existing one (keeping the user's data). }
procedure InstallDistro;
var
  Rootfs, Target: String;
begin
  Rootfs := ExpandConstant('{app}\wsl\corolla-wsl-rootfs.tar.gz');
  Target := ExpandConstant('{localappdata}\Corolla\wsl');
  if DistroExists then begin
    RunHidden(WslPath, '--terminate {#Distro}');
    RunHidden(WslPath, '--distribution {#Distro} --user root --exec sh -c "rm -rf /opt/corolla && ' +
              'tar -xzf \"$(wslpath -u ''' + Rootfs + ''')\" -C / ./opt/corolla"');
  end else begin
    ForceDirectories(Target);
    if RunHidden(WslPath, '--import {#Distro} "' + Target + '" "' + Rootfs + '" --version 2') <> 0 then
      SuppressibleMsgBox('Importing the Corolla WSL distro failed. Run the installer again, or run: wsl --import ' +
             '{#Distro} "' + Target + '" "' + Rootfs + '" --version 2', mbError, MB_OK, IDOK);
  end;
end;

procedure CurStepChanged(CurStep: TSetupStep);
begin
  if CurStep = ssPostInstall then begin
    if not WslReady and not WslNeedsReboot then
      EnableWsl;
    if WslReady then
      InstallDistro;
  end;
end;

function NeedRestart: Boolean;
begin
  Result := WslNeedsReboot;
end;

{ After a restart that enabled WSL, the window imports nothing itself: re-running setup finishes. }
procedure CurUninstallStepChanged(CurUninstallStep: TUninstallStep);
begin
  if CurUninstallStep = usUninstall then begin
    RunHidden(ExpandConstant('{app}\Corolla.exe'), 'uninstall');
    if DistroExists and (SuppressibleMsgBox('Also delete your Corolla data (chat history, contribution stats, settings)?',
                                 mbConfirmation, MB_YESNO, IDNO) = IDYES) then
      RunHidden(WslPath, '--unregister {#Distro}');
  end;
end;
